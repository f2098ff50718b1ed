"""Applying one review request in the worker's model thread (:class:`ReviewApplier`).

- ``ok`` (a false alarm): the kept frame is scored against the line's memory as it is (the score before), its
  uncovered patches are added to the memory and its raw score joins the held-out window
  (:func:`workers.memory.teach.teach_normal`), it is scored again (the score and verdict after), and the image
  goes to the labelled folder's ``test/good``. With a map source without memory (``clip``) nothing can be
  learned: the frame is still filed as good and the outcome says why it failed.
- ``defect`` (confirmed): the image and its published mask go to ``test/confirmed`` and
  ``ground_truth/confirmed`` (:class:`workers.review.labelled.LabelledFolder`); no model work.

Scores are image scores with 1.0 = the threshold in force (the pipeline's verdict rule: DEFECT above 1.0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stream.contracts import PayloadError, Verdict
from stream.review.archive import ReviewArchive
from stream.review.requests import FrameNotKept, ReviewError, ReviewRequest
from workers.memory.teach import TeachError, teach_normal
from workers.review.labelled import LabelledFolder, LabelledWriteError


@dataclass(frozen=True)
class Applied:
    """What applying a request did (the worker turns it into a :class:`stream.review.requests.ReviewOutcome`)."""

    outcome: str  # "applied" | "failed"
    reason: str = ""
    rows_added: int = 0
    memory_rows: int = 0
    score_before: float = -1.0
    score_after: float = -1.0
    verdict_after: str = ""
    files: tuple[str, ...] = ()


def memory_of(detector: Any):
    """The detector's memory mapper (map source memory, or the memory part of fusion), or None."""
    from workers.memory.mapper import MemoryMapper

    mapper = getattr(detector, "mapper", None)
    if isinstance(mapper, MemoryMapper):
        return mapper
    inner = getattr(mapper, "memory", None)
    return inner if isinstance(inner, MemoryMapper) else None


def _verdict(score: float) -> str:
    return (Verdict.DEFECT if score > 1.0 else Verdict.OK).value


class ReviewApplier:
    """Applies requests of ``line`` with ``detector`` (only ever from the model thread)."""

    def __init__(self, detector: Any, archive: ReviewArchive, labelled: LabelledFolder, line: str,
                 max_frame_pixels: int):
        self.detector = detector
        self.archive = archive
        self.labelled = labelled
        self.line = line
        self.max_frame_pixels = max_frame_pixels

    def apply(self, request: ReviewRequest) -> Applied:
        """Apply ``request``; an error of the request itself (frame gone, unreadable, memory in warm-up, a
        file that cannot be written) is a failed outcome. Redis being down is raised (the request is retried)."""
        from stream import wire

        try:
            kept = self.archive.get(request.frame_id)
            if kept is None:
                raise FrameNotKept(request.frame_id, self.archive.window_mib())
            frame = wire.decode_frame(kept.frame, self.max_frame_pixels)
            image = wire.frame_to_image(frame, self.max_frame_pixels)
            result = wire.decode_result(kept.result)
            if request.decision == "defect":
                return self._confirm(request, image, result)
            return self._learn(request, image)
        except (ReviewError, TeachError, LabelledWriteError, PayloadError) as exc:
            return Applied("failed", reason=str(exc))

    def _confirm(self, request: ReviewRequest, image, result) -> Applied:
        from stream.wire import result_mask

        labels = result_mask(result, image.shape[:2])
        img_path, mask_path = self.labelled.write_confirmed(self.line, request.frame_id, image, labels)
        reason = "" if labels is not None else "the result carried no mask: the mask file is empty (all 0)"
        return Applied("applied", reason=reason, score_before=float(result.image_score),
                       score_after=float(result.image_score), verdict_after=result.verdict.value,
                       files=(str(img_path), str(mask_path)))

    def _learn(self, request: ReviewRequest, image) -> Applied:
        memory = memory_of(self.detector)
        if memory is None:
            files, note = self._file_good(request, image)
            name = getattr(getattr(self.detector, "mapper", None), "name", type(self.detector).__name__)
            return Applied("failed", reason=f"OK could not be learned: this worker's map source ({name}) has no "
                                            "memory of normal patches" + (note or "; the frame was filed as good only"),
                           files=files)
        emb = self.detector.embed(image, request.frame_id)
        mapper = self.detector.mapper
        before = None if mapper is memory else float(mapper.map(image, emb).image_score)
        taught = teach_normal(memory, image, emb)
        if before is None:
            before = taught.score_before
        after = float(mapper.map(image, emb).image_score)
        files, note = self._file_good(request, image)  # the memory learned it even if the file cannot be written
        return Applied("applied", reason=note.lstrip("; "), rows_added=taught.rows_added,
                       memory_rows=taught.rows_after, score_before=before, score_after=after,
                       verdict_after=_verdict(after), files=files)

    def _file_good(self, request: ReviewRequest, image) -> tuple[tuple[str, ...], str]:
        """The frame filed under test/good: (its path,) and "", or () and why it could not be written."""
        try:
            return (str(self.labelled.write_good(self.line, request.frame_id, image)),), ""
        except LabelledWriteError as exc:
            return (), f"; not filed in the labelled folder: {exc}"
