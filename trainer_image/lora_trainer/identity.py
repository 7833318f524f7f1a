"""Identity score: does the LoRA draw the actor's face, and which checkpoint to publish.

During the last part of training, at a few steps, the trainer renders a small
fixed set of portraits (fixed prompts and seeds, few denoising steps), finds
the face in each with ``actorgen.faces`` (the detector and embedding that upload
validation uses) and measures its embedding distance to the actor's photos.
Each evaluated step gets a score; the step with the best score is published,
or the last step when no sample had a face at all (random test weights, or a
run that broke the model) or when choosing is turned off.

Score of one sample: ``max(0, 1 - d)``, with ``d`` the mean embedding distance
of its face to the actor's photos, and 0 for a sample without a face. dlib's
distances are about 0.1-0.45 for the same person and 0.6-0.9 for others (its
same-person threshold is 0.6), so a score near 0.7 is a likeness and below 0.4
is someone else. Score of a step: the mean over its samples, so a step that
draws the face in fewer samples scores lower too.

The pure part (scores, steps, choice) is separate from rendering and face
analysis, so it is tested with real scores directly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    import torch

    from .config import TrainConfig
    from .data import ImageRef
    from .models import LoadedModel

log = logging.getLogger(__name__)

#: Portrait prompts of the identity samples; ``{trigger}`` is "<instance> <class word>".
IDENTITY_PROMPTS: Final = (
    "a close-up portrait photo of {trigger}, looking at the camera",
    "a photo of {trigger}, head and shoulders, plain background",
    "a photo of {trigger} smiling, natural light",
    "a headshot of {trigger}, studio lighting",
)
#: Added to the job's seed: the identity samples differ from the exported ones.
SEED_OFFSET: Final = 7919
#: Key of the tracker's state inside a checkpoint's training state.
STATE_KEY: Final = "identity"

# Choice reasons (``metrics.identity.choice``).
BEST: Final = "best"
LAST_NO_FACES: Final = "last-no-faces"
LAST_NOT_BEST: Final = "last-best-off"
OFF: Final = "off"
NO_REFERENCE: Final = "no-reference"


# ---------------------------------------------------------------------------- pure
def sample_similarity(distance: float | None) -> float:
    """A sample's score: ``1 - distance`` clipped to [0, 1]; 0 when it has no face."""
    if distance is None:
        return 0.0
    return min(1.0, max(0.0, 1.0 - distance))


@dataclass(frozen=True)
class CheckpointScore:
    """The identity score of the LoRA at one step."""

    step: int
    samples: int  # rendered
    faces: int  # samples with a face
    matches: int  # faces within the same-person distance of the actor
    mean_distance: float | None  # over the samples with a face
    score: float  # mean sample score, 0 for samples without a face
    seconds: float = 0.0  # rendering and face analysis
    error: str | None = None  # why the step could not be scored

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "step": self.step,
            "score": round(self.score, 4),
            "faces": self.faces,
            "samples": self.samples,
            "matches": self.matches,
            "meanDistance": None if self.mean_distance is None else round(self.mean_distance, 4),
            "seconds": round(self.seconds, 3),
        }
        if self.error:
            out["error"] = self.error
        return out

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> CheckpointScore:
        distance = value.get("meanDistance")
        return cls(step=int(value["step"]), samples=int(value["samples"]),
                   faces=int(value["faces"]), matches=int(value["matches"]),
                   mean_distance=None if distance is None else float(distance),
                   score=float(value["score"]), seconds=float(value.get("seconds", 0.0)),
                   error=value.get("error"))


def score_checkpoint(step: int, distances: Sequence[float | None], *,
                     same_person_max: float, seconds: float = 0.0) -> CheckpointScore:
    """Score one step from the distance of each sample's face (None: no face)."""
    found = [d for d in distances if d is not None]
    return CheckpointScore(
        step=step,
        samples=len(distances),
        faces=len(found),
        matches=sum(d < same_person_max for d in found),
        mean_distance=sum(found) / len(found) if found else None,
        score=sum(sample_similarity(d) for d in distances) / len(distances) if distances else 0.0,
        seconds=seconds,
    )


def reference_distance(embedding: Sequence[float], references: Sequence[Sequence[float]],
                       distance: Callable[[Sequence[float], Sequence[float]], float]) -> float:
    """Mean distance of ``embedding`` to the actor's photos' embeddings."""
    if not references:
        raise ValueError("no reference embeddings")
    return sum(distance(embedding, ref) for ref in references) / len(references)


def evaluation_steps(total_steps: int, count: int, fraction: float) -> list[int]:
    """``count`` steps spread evenly over the last ``fraction`` of training, ending at the last.

    800 steps, 3 evaluations, fraction 0.3: 640, 720, 800.
    """
    if count <= 0 or total_steps <= 0:
        return []
    steps = {max(1, round(total_steps * (1 - fraction * (count - k) / count)))
             for k in range(1, count + 1)}
    return sorted(s for s in steps if s <= total_steps)


@dataclass(frozen=True)
class Choice:
    """Which step's LoRA is published, and why (``reason`` is one of the codes above)."""

    step: int
    reason: str
    note: str
    score: CheckpointScore | None = None


def choose_checkpoint(scores: Sequence[CheckpointScore], last_step: int, *,
                      prefer_best: bool = True) -> Choice:
    """The step to publish: the best-scored one among steps where a sample had a face.

    Ties go to the later step (more training for the same likeness). The last
    step when no sample of any step had a face, or when ``prefer_best`` is off.
    """
    scored = [s for s in scores if s.faces > 0 and s.error is None]
    last = next((s for s in scores if s.step == last_step), None)
    if not scores:
        return Choice(last_step, OFF, "the identity score was not measured; the last step "
                      "is published", None)
    if not scored:
        return Choice(last_step, LAST_NO_FACES,
                      f"no identity sample had a face at any of the {len(scores)} evaluated "
                      f"steps, so the last step ({last_step}) is published unscored", last)
    best = max(scored, key=lambda s: (s.score, s.step))
    if not prefer_best:
        return Choice(last_step, LAST_NOT_BEST,
                      f"choosing the best checkpoint is off: the last step ({last_step}) is "
                      f"published; the best identity score was at step {best.step}", last)
    if best.step == last_step:
        return Choice(last_step, BEST, f"the last step ({last_step}) has the best identity "
                      f"score ({best.score:.3f})", best)
    return Choice(best.step, BEST, f"step {best.step} has the best identity score "
                  f"({best.score:.3f}) and is published instead of the last step "
                  f"({last_step})", best)


# ------------------------------------------------------------------- the tracker
@dataclass
class IdentityTracker:
    """Scores the LoRA at the evaluation steps and keeps the best step's weights.

    ``judge`` renders the identity samples with the LoRA as it is and returns
    each sample's face distance to the actor (None: no face). Its state
    (scores and the best weights) travels in the checkpoints, so a resumed run
    can still publish a step from before the interruption.
    """

    steps: list[int]
    judge: Callable[[], list[float | None]] | None
    same_person_max: float
    #: What the scores depend on besides the weights (samples, prompts, seeds, steps):
    #: a checkpoint's scores made with other settings are not compared with new ones.
    settings: dict[str, Any] = field(default_factory=dict)
    prefer_best: bool = True
    reference_photos: int = 0
    disabled_note: str | None = None  # why nothing is measured
    disabled_reason: str = OFF  # OFF or NO_REFERENCE
    scores: list[CheckpointScore] = field(default_factory=list)
    best_step: int | None = None
    best_weights: dict[str, torch.Tensor] | None = None

    def due(self, step: int) -> bool:
        return (self.judge is not None and step in self.steps
                and all(s.step != step for s in self.scores))

    def maybe_evaluate(self, step: int,
                       weights: Callable[[], dict[str, torch.Tensor]]) -> CheckpointScore | None:
        """Score ``step`` if it is an evaluation step not yet scored; keep its weights if best."""
        if not self.due(step):
            return None
        started = time.monotonic()
        try:
            distances = self.judge()  # type: ignore[misc]
        except Exception as err:  # noqa: BLE001 - a failed score must not cost the training
            message = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
            log.warning("identity score at step %d failed: %s", step, message)
            score = CheckpointScore(step, 0, 0, 0, None, 0.0,
                                    time.monotonic() - started, error=message)
            self.scores.append(score)
            return score
        score = score_checkpoint(step, distances, same_person_max=self.same_person_max,
                                 seconds=time.monotonic() - started)
        self.scores.append(score)
        best = self.best_score()
        if score.faces and (best is None or score.score >= best.score):
            self.best_step, self.best_weights = step, weights()
        log.info("identity score at step %d: %.3f (%d of %d samples with a face, %d match, "
                 "mean distance %s) in %.1f s", step, score.score, score.faces, score.samples,
                 score.matches, "-" if score.mean_distance is None
                 else f"{score.mean_distance:.3f}", score.seconds)
        return score

    def best_score(self) -> CheckpointScore | None:
        return next((s for s in self.scores if s.step == self.best_step), None)

    def choose(self, last_step: int) -> Choice:
        if self.judge is None:
            return Choice(last_step, self.disabled_reason, self.disabled_note
                          or "the identity score is off; the last step is published")
        choice = choose_checkpoint(self.scores, last_step, prefer_best=self.prefer_best)
        if choice.step != last_step and choice.step != self.best_step:
            # Only the best step's weights are kept; never publish what is not there.
            return Choice(last_step, choice.reason, choice.note + " (its weights were not "
                          "kept; the last step is published)", choice.score)
        return choice

    def state_dict(self) -> dict[str, Any]:
        return {
            "settings": dict(self.settings),
            "scores": [s.as_dict() for s in self.scores],
            "bestStep": self.best_step,
            "bestWeights": self.best_weights,
        }

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        if not state:
            return
        if dict(state.get("settings") or {}) != self.settings:
            log.warning("the checkpoint's identity scores were made with other settings "
                        "(%s, now %s); scoring afresh", state.get("settings"), self.settings)
            return
        self.scores = [CheckpointScore.from_dict(s) for s in state.get("scores") or []]
        self.best_step = state.get("bestStep")
        self.best_weights = state.get("bestWeights")
        if self.best_weights is not None:
            self.best_weights = {k: v.cpu() for k, v in self.best_weights.items()}

    def metrics(self, choice: Choice, *, samples: int, sample_steps: int) -> dict[str, Any]:
        """``metrics.identity`` on the job document (and the model card)."""
        return {
            "choice": choice.reason,
            "publishedStep": choice.step,
            "note": choice.note,
            "score": None if choice.score is None or choice.reason == LAST_NO_FACES
            else round(choice.score.score, 4),
            "checkpoints": [s.as_dict() for s in self.scores],
            "referencePhotos": self.reference_photos,
            "samplesPerCheckpoint": samples if self.judge is not None else 0,
            "sampleSteps": sample_steps,
            "sameIdentityMaxDistance": self.same_person_max,
            "seconds": round(sum(s.seconds for s in self.scores), 3),
        }


def step_hook(tracker: IdentityTracker, trainer: Any, timer: Any) -> Callable[[int], None]:
    """The training loop's ``on_step``: score a due step, timed as its own phase."""
    from .timing import Phase

    def on_step(step: int) -> None:
        if tracker.due(step):
            with timer.phase(Phase.IDENTITY):
                tracker.maybe_evaluate(step, trainer.trainable_state)

    return on_step


# ---------------------------------------------------------- references and judging
def reference_embeddings(actor: Mapping[str, Any], refs: Sequence[ImageRef],
                         files: Sequence[Path]) -> tuple[list[list[float]], int]:
    """The actor's photos' face embeddings: stored on the image records, else computed.

    Returns the embeddings and how many had to be computed (records written
    before embeddings were stored, or whose embedding was unreadable).
    """
    from actorgen import faces, imaging, schema

    records = actor.get(schema.Field.IMAGES) or {}
    out, computed = [], 0
    for ref, path in zip(refs, files, strict=True):
        record = records.get(ref.image_id)
        stored = faces.embedding_from_record(record) if isinstance(record, Mapping) else None
        if stored is not None:
            out.append(stored)
            continue
        try:
            found = faces.analyze_faces(imaging.decode_image(Path(path).read_bytes()))
        except Exception as err:  # noqa: BLE001 - one unreadable photo is no reference
            log.warning("no reference embedding from %s: %s", ref.file_name, err)
            continue
        computed += 1
        if found:
            out.append(list(found[0].embedding))
    return out, computed


def identity_prompts(config: TrainConfig) -> list[tuple[str, int]]:
    """``(prompt, seed)`` of each identity sample: fixed, so steps are comparable."""
    prompts = [IDENTITY_PROMPTS[i % len(IDENTITY_PROMPTS)].format(trigger=config.trigger)
               for i in range(config.identity_samples)]
    return [(p, config.seed + SEED_OFFSET + i) for i, p in enumerate(prompts)]


def sample_judge(model: LoadedModel, config: TrainConfig, resolution: int,
                 references: Sequence[Sequence[float]]) -> Callable[[], list[float | None]]:
    """Render the identity samples with the LoRA as it is; each one's face distance."""

    def judge() -> list[float | None]:
        return face_distances(render_identity_samples(model, config, resolution), references)

    return judge


def face_distances(images: Sequence[Any],
                   references: Sequence[Sequence[float]]) -> list[float | None]:
    """Mean distance of the largest face in each image to ``references`` (None: no face)."""
    from actorgen import faces

    distances: list[float | None] = []
    for image in images:
        # HOG only: the samples are frontal portrait prompts, and the CNN fallback costs
        # seconds of the GPU worker's CPU per faceless sample (random or early weights).
        found = faces.analyze_faces(image.convert("RGB"), cnn_fallback=False)
        distances.append(None if not found else reference_distance(
            found[0].embedding, references, faces.embedding_distance))
    return distances


def render_identity_samples(model: LoadedModel, config: TrainConfig,
                            resolution: int) -> list[Any]:
    """The identity samples (PIL); the frozen encoders come back for it and leave again."""
    import torch

    from .encode import offload_frozen_encoders, restore_encoders
    from .export import render_image

    modes = {name: module.training for name, module in
             (("unet", model.unet), *((f"te{i}", te) for i, te in enumerate(model.text_encoders)))}
    restore_encoders(model)
    model.unet.eval()
    try:
        with torch.no_grad():
            return [render_image(model, prompt, seed, resolution,
                                 steps=config.identity_sample_steps,
                                 guidance_scale=config.guidance_scale)
                    for prompt, seed in identity_prompts(config)]
    finally:
        model.unet.train(modes["unet"])
        for i, te in enumerate(model.text_encoders):
            te.train(modes[f"te{i}"])
        offload_frozen_encoders(model, keep_text_encoders=config.train_text_encoder)


def make_tracker(model: LoadedModel, config: TrainConfig, resolution: int,
                 actor: Mapping[str, Any], refs: Sequence[ImageRef],
                 files: Sequence[Path]) -> IdentityTracker:
    """The tracker of one run: off when asked, or without any reference face."""
    from actorgen import faces

    steps = evaluation_steps(config.max_train_steps, config.identity_checkpoints,
                             config.identity_fraction)
    tracker = IdentityTracker(steps=steps, judge=None,
                              same_person_max=faces.SAME_PERSON_MAX_DISTANCE,
                              prefer_best=config.publish_best_identity,
                              settings={"steps": steps,
                                        "prompts": [list(p) for p in identity_prompts(config)],
                                        "sampleSteps": config.identity_sample_steps,
                                        "guidanceScale": config.guidance_scale})
    if not steps or config.identity_samples <= 0:
        tracker.disabled_note = "the identity score is off; the last step is published"
        return tracker
    references, computed = reference_embeddings(actor, refs, files)
    tracker.reference_photos = len(references)
    if not references:
        tracker.disabled_reason = NO_REFERENCE
        tracker.disabled_note = ("no face embedding could be had from the actor's photos, so "
                                 "no identity score; the last step is published")
        log.warning("%s", tracker.disabled_note)
        return tracker
    log.info("identity score at steps %s from %d samples of %d steps, against %d photos "
             "(%d embeddings computed here)", steps, config.identity_samples,
             config.identity_sample_steps, len(references), computed)
    tracker.judge = sample_judge(model, config, resolution, references)
    return tracker


def card_section(identity: Mapping[str, Any] | None) -> str:
    """The model card's identity section (markdown), empty without a measurement."""
    if not identity:
        return ""
    rows = "\n".join(
        f"| {c['step']} | {c['score']:.3f} | {c['faces']} of {c['samples']} | {c['matches']} | "
        f"{'-' if c.get('meanDistance') is None else format(c['meanDistance'], '.3f')} |"
        + (f" {c['error']} |" if c.get("error") else " |")
        for c in identity.get("checkpoints") or []
    )
    table = ("| step | score | samples with a face | same person | mean distance | |\n"
             "| --- | --- | --- | --- | --- | --- |\n" + rows) if rows else ""
    return f"""
## Identity

{identity.get("note", "")}. Published step: {identity.get("publishedStep")}.

Each evaluated step rendered {identity.get("samplesPerCheckpoint", 0)} fixed portraits
({identity.get("sampleSteps")} denoising steps); the face in each was compared with the
{identity.get("referencePhotos", 0)} photos of the person (dlib face embeddings; distance
below {identity.get("sameIdentityMaxDistance")} is the same person). Score: mean over the
samples of 1 - distance, 0 for a sample without a face.

{table}
"""
