"""Text prompt ensemble for CLIP anomaly maps: normal/abnormal state phrases x photo templates.

Each state's prompts are embedded once with the frozen text tower, L2-normalised, averaged and normalised
again (docs/method.md section 1). ``{}`` in a state phrase is the product name; without one the
class-agnostic word "object" is used.
"""

from __future__ import annotations

DEFAULT_OBJECT = "object"

NORMAL_STATES: tuple[str, ...] = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "intact {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)

ABNORMAL_STATES: tuple[str, ...] = (
    "damaged {}",
    "broken {}",
    "defective {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
    "scratched {}",
    "cracked {}",
)

TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a close-up photo of the {}.",
    "a cropped photo of the {}.",
    "a bright photo of a {}.",
    "a dark photo of the {}.",
    "a low resolution photo of the {}.",
    "a photo of a small {}.",
    "an industrial photo of a {}.",
    "a photo of a {} on a production line.",
    "there is a {} in the scene.",
)


def object_word(class_name: str | None) -> str:
    name = (class_name or "").strip().replace("_", " ")
    return name or DEFAULT_OBJECT


def state_prompts(class_name: str | None = None) -> tuple[list[str], list[str]]:
    """The (normal, abnormal) prompt lists for a product name (or "object")."""
    obj = object_word(class_name)
    normal = [t.format(s.format(obj)) for s in NORMAL_STATES for t in TEMPLATES]
    abnormal = [t.format(s.format(obj)) for s in ABNORMAL_STATES for t in TEMPLATES]
    return normal, abnormal


def ensemble_text_embeddings(backbone, class_name: str | None = None):
    """[2, D] float tensor: row 0 the normal, row 1 the abnormal state embedding (each L2-normalised)."""
    import torch
    import torch.nn.functional as F

    from workers.clip.backbone import encode_text

    normal, abnormal = state_prompts(class_name)
    emb = encode_text(backbone, normal + abnormal)
    states = torch.stack([emb[: len(normal)].mean(0), emb[len(normal):].mean(0)])
    return F.normalize(states, dim=-1)
