"""``lineinspect``: one console script, one subcommand per process or tool.

The parser is built here without importing any subcommand's module; each subcommand lazily imports its
module and calls ``main(settings, args) -> int``. So ``lineinspect ingest`` never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback
from collections.abc import Mapping, Sequence
from types import MappingProxyType

from config.loading import parse_override
from config.settings import Settings, SettingsError, check_ident
from stream.redact import install_log_redaction, redact_text

# subcommand -> module whose main(settings, args) runs it
COMMANDS: Mapping[str, str] = MappingProxyType({
    "ingest": "stream.ingest",
    "worker": "workers.worker",
    "results": "stream.results",
    "demo": "stream.demo",
    "predict": "workers.predict",
    "eval": "workers.evaluate",
    "memory": "workers.memory.cli",
    "train-adapter": "workers.clip.train",
    "train-prompts": "workers.clip.vip2_train",
    "alerts": "stream.alerts.run",
    "preview": "stream.preview.run",
    "bench": "stream.bench",
    "redis": "stream.migrate",
    "config": "stream.effective_settings",
    "review": "stream.review.command",
})


def _parse_set(value: str) -> tuple[str, object]:
    try:
        return parse_override(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _line_id(value: str) -> str:
    """A --line value: the characters the Redis key layouts allow (config.settings.check_ident)."""
    try:
        return check_ident("--line", value)
    except SettingsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lineinspect", description="Zero-shot defect inspection for production lines.")
    p.add_argument("--config", "-c", action="append", default=[], metavar="FILE",
                   help="settings YAML, deep-merged over config/default.yaml (repeatable)")
    p.add_argument("--set", dest="overrides", action="append", default=[], type=_parse_set, metavar="KEY=VALUE",
                   help="override one setting, e.g. --set queue.maxlen=500 (repeatable)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _run_commands(sub)
    _offline_commands(sub)
    _service_and_tool_commands(sub)
    return p


def _run_commands(sub) -> None:
    """The pipeline's processes and the demo."""
    s = sub.add_parser("ingest", help="run one camera's ingest process (camera -> Redis stream)")
    s.add_argument("--camera", required=True, help="camera id from settings.cameras")

    s = sub.add_parser("worker", help="run a detection worker process for a line")
    s.add_argument("--line", required=True, type=_line_id)
    s.add_argument("--id", dest="worker_id", default=None, help="consumer name (default: host-pid)")
    s.add_argument("--detector", default="pipeline",
                   help="pipeline (the real detector) | noop | slow:SECONDS (tests, benchmarks)")

    s = sub.add_parser("results", help="print a line's results (and optionally write overlays)")
    s.add_argument("--line", required=True, type=_line_id)
    s.add_argument("--follow", "-f", action="store_true", help="keep printing new results")
    s.add_argument("--overlays", metavar="DIR", default=None, help="write overlay images here")
    s.add_argument("--count", type=int, default=0, help="stop after N results (0 = no limit)")
    s.add_argument("--from-start", action="store_true", help="begin with the oldest stored result")

    s = sub.add_parser("demo", help="run the whole pipeline locally on the bundled demo images")
    s.add_argument("--out", default="runs/demo", help="overlay images and summary go here")
    s.add_argument("--frames", type=int, default=0, help="stop after N test frames (0 = all bundled)")
    s.add_argument("--fps", type=float, default=0.0, help="conveyor frame rate (0 = as fast as inspected)")
    s.add_argument("--workers", type=int, default=1)
    s.add_argument("--detector", default="pipeline")
    s.add_argument("--memory-images", type=int, default=0,
                   help="learn the line from the first N bundled good images (0 = all)")


def _offline_commands(sub) -> None:
    """Detection without the stream: predict, eval, the line's memory, training."""
    s = sub.add_parser("predict", help="offline: masks and score maps for a folder of images")
    s.add_argument("input", metavar="IN_DIR")
    s.add_argument("--out", required=True, metavar="OUT_DIR")
    s.add_argument("--normal", default=None, metavar="NORMAL_DIR", help="known-good images for the memory")
    s.add_argument("--cps-stages", type=int, default=None, choices=(0, 1, 2, 3))
    s.add_argument("--line", default="offline")
    s.add_argument("--embedding-cache", default="", metavar="DIR",
                   help="keep SAM encoder outputs here and reuse them on later runs (same model and images)")

    s = sub.add_parser("eval", help="offline: metrics on MVTec-layout data")
    s.add_argument("root", metavar="DATASET_ROOT")
    s.add_argument("--categories", default="", help="comma-separated subset")
    mode = s.add_mutually_exclusive_group()
    mode.add_argument("--normal-from-train", action="store_true", help="memory from each category's train/good")
    mode.add_argument("--mutual", action="store_true", help="label-free: score test images against each other")
    mode.add_argument("--modes", default="", metavar="MODES",
                      help="memory modes to evaluate in one report, comma-separated: train, mutual (e.g. train,mutual)")
    s.add_argument("--normal", default=None, metavar="DIR",
                   help="known-good images for every category's memory instead of its train/good (e.g. the "
                        "line's good parts, for a labelled folder grown by operator review)")
    s.add_argument("--embedding-cache", default="", metavar="DIR",
                   help="keep SAM encoder outputs here and reuse them on later runs (same model and images)")
    s.add_argument("--cps-stages", default="0,1,2,3", help="comma-separated CPS stages to evaluate")
    s.add_argument("--kernel", default="", help="PPG ring kernel, e.g. ellipse:25 or rect:15")
    s.add_argument("--max-images", type=int, default=0, help="at most N test images per category (0 = all)")
    s.add_argument("--out", default="runs/eval")
    s.add_argument("--prompts", choices=("ensemble", "vip2"), default=None)
    s.add_argument("--pixel-size", type=int, default=256,
                   help="pixel metrics pool maps and masks at this longer side (0 = native size)")

    s = sub.add_parser("memory", help="a line's normal memory: add known-good images, show, clear")
    s.add_argument("action", choices=("add", "show", "clear"))
    s.add_argument("line", type=_line_id)
    s.add_argument("dir", nargs="?", default=None, help="folder of known-good images (add)")

    s = sub.add_parser("train-adapter", help="train per-layer linear CLIP adapters on an auxiliary set")
    s.add_argument("dataset", metavar="DATASET")
    s.add_argument("--out", required=True)
    s.add_argument("--epochs", type=int, default=5)
    s.add_argument("--batch", type=int, default=8)
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--max-images", type=int, default=0)

    s = sub.add_parser("train-prompts", help="train ViP2-CLIP prompts (ICA + FGP) on an auxiliary set")
    s.add_argument("dataset", metavar="DATASET")
    s.add_argument("--out", required=True)
    s.add_argument("--epochs", type=int, default=10)
    s.add_argument("--batch", type=int, default=8)
    s.add_argument("--lr-ica", type=float, default=1e-3)
    s.add_argument("--lr-fgp", type=float, default=1e-5)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--max-images", type=int, default=0)


def _service_and_tool_commands(sub) -> None:
    """Alerts, preview, benchmarks, Redis maintenance, the effective settings."""
    s = sub.add_parser("alerts", help="turn defect results into alerts (webhook, Redis stream, MQTT)")
    s.add_argument("--line", action="append", required=True, type=_line_id, help="line to watch (repeatable)")

    s = sub.add_parser("preview", help="WebRTC overlay preview (needs lineinspect[preview])")
    s.add_argument("--max-side", type=int, default=1280, help="scale frames to this longer side (0 = no scaling)")
    s.add_argument("--result-wait-ms", type=float, default=250.0,
                   help="how long a frame waits for its own result before the latest one is drawn")
    s.add_argument("--max-viewers", type=int, default=32)

    s = sub.add_parser("bench", help="print throughput figures against their limits")
    s.add_argument("--detector", default="noop", help="noop (pipeline overhead) | pipeline (real detector)")
    s.add_argument("--frames", type=int, default=200)
    s.add_argument("--width", type=int, default=1920)
    s.add_argument("--height", type=int, default=1080)
    s.add_argument("--detector-frames", type=int, default=10,
                   help="with --detector pipeline: frames per worker run (at most --frames)")
    s.add_argument("--repeat", type=int, default=1,
                   help="with --detector pipeline: worker runs with overlap off and on, alternating, each")
    s.add_argument("--prompt-modes", action="store_true",
                   help="instead: per-frame time of the CLIP map with ensemble vs ViP2 prompts")
    s.add_argument("--clip-model", default="ViT-S-32", help="with --prompt-modes: open_clip model")
    s.add_argument("--clip-size", type=int, default=224, help="with --prompt-modes: input size")
    s.add_argument("--clip-pretrained", default="random",
                   help="with --prompt-modes: weights (random = timing only, here no CLIP weights exist)")
    s.add_argument("--chaos", action="store_true",
                   help="instead: the chaos benchmark (real processes, private Redis, faults; one accounting table)")
    s.add_argument("--scenarios", default="",
                   help="with --chaos: comma-separated subset of crash_loop,restart_no_aof,restart_aof,redis_full,"
                        "frozen,fuzz")
    s.add_argument("--chaos-seconds", type=float, default=12.0, help="with --chaos: seconds per fault scenario")
    s.add_argument("--kill-every", type=float, default=5.0, help="with --chaos: crash loop kill period")
    s.add_argument("--fuzz", type=int, default=100_000, help="with --chaos: crafted payloads in the fuzz scenario")

    s = sub.add_parser("redis", help="Redis maintenance: migrate-keys (rename keys to another redis.key_layout)")
    s.add_argument("action", choices=["migrate-keys"])
    s.add_argument("--to", choices=["line_tag", "plain"], default="line_tag")
    s.add_argument("--dry-run", action="store_true", help="print the renames only")

    sub.add_parser("config", help="print the effective settings (after files and environment) and exit")

    s = sub.add_parser("review", help="operator review of a kept frame: ok (false alarm) or defect (confirmed)")
    s.add_argument("--line", required=True, type=_line_id, help="the frame's line")
    s.add_argument("frame_id", nargs="?", default=None, metavar="FRAME_ID")
    s.add_argument("decision", nargs="?", default=None, choices=("ok", "defect"))
    s.add_argument("--who", default="cli", help="operator name written to the audit stream")
    s.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait this long for a worker to apply it, then print the outcome")
    s.add_argument("--list", type=int, nargs="?", const=20, default=None, metavar="N",
                   help="list the N most recent kept verdicts instead (default 20)")
    s.add_argument("--defects", action="store_true", help="with --list: DEFECT verdicts only")


def load_settings(args: argparse.Namespace) -> Settings:
    return Settings.load(*args.config, overrides=dict(args.overrides))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args)
    except SettingsError as exc:
        print(f"lineinspect: {redact_text(exc)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level,
                        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s")
    install_log_redaction()  # every log line of every subcommand: URL passwords masked
    module = importlib.import_module(COMMANDS[args.command])
    try:
        return int(module.main(settings, args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception:  # an unexpected error: its traceback, with URL passwords masked
        print(redact_text(traceback.format_exc()), file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
