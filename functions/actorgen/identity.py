"""One person per actor: which of an actor's photos show the actor's person.

Pure policy over face embeddings (``actorgen.faces``), used by upload
validation (to judge, and re-judge, every photo whose face is usable) and by
job intake (to check the accepted set once more).

The person is the largest consistent group of faces, found the same way
whatever order the photos arrived in:

1. every face's neighbours are the faces within ``SAME_PERSON_MAX_DISTANCE`` of it;
2. the anchor is the face with the most neighbours (ties: the smaller sum of
   distances to them, then the smaller photo id, so no arrival order enters);
3. the person is the mean embedding of the anchor's neighbours, and the group is
   every face within ``SAME_PERSON_MAX_DISTANCE`` of that mean;
4. the group is *decisive* when it has at least :data:`MIN_GROUP` faces and more
   than any group the other faces form among themselves. Only then are the other
   faces "a different person"; before that (one photo, or two photos of two
   people, or a tie) nothing is rejected for identity, and intake names the
   photos to remove if the tie is still there when training is asked for.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from actorgen.faces import SAME_PERSON_MAX_DISTANCE, embedding_distance

#: Faces that must agree before photos of anyone else are rejected.
MIN_GROUP: Final = 2


@dataclass(frozen=True)
class IdentityJudgement:
    """The actor's person among a set of faces (photo id -> embedding)."""

    members: frozenset[str]  # photos of the person (all of them when not decisive)
    outsiders: frozenset[str]  # photos of someone else (empty when not decisive)
    decisive: bool
    #: Distance of each photo's face to the person (the group's mean embedding).
    distances: Mapping[str, float] = field(default_factory=dict)
    #: When not decisive: the groups the faces form, largest first (for messages).
    groups: tuple[frozenset[str], ...] = ()

    def distance(self, photo_id: str) -> float | None:
        return self.distances.get(photo_id)


def judge_identity(
    embeddings: Mapping[str, Sequence[float]],
    *,
    max_distance: float = SAME_PERSON_MAX_DISTANCE,
    min_group: int = MIN_GROUP,
) -> IdentityJudgement:
    """Who the actor's person is among ``embeddings`` (see the module docstring)."""
    ids = sorted(embeddings)
    if not ids:
        return IdentityJudgement(frozenset(), frozenset(), False)
    group, centre = _largest_group(ids, embeddings, max_distance)
    rest = [i for i in ids if i not in group]
    rival = _largest_group(rest, embeddings, max_distance)[0] if rest else frozenset()
    distances = {i: round(embedding_distance(embeddings[i], centre), 4) for i in ids}
    if len(group) >= min_group and len(group) > len(rival):
        return IdentityJudgement(group, frozenset(rest), True, distances, (group,))
    groups = [group]
    while rest:  # the other groups, for a message naming who is who
        found = _largest_group(rest, embeddings, max_distance)[0]
        groups.append(found)
        rest = [i for i in rest if i not in found]
    return IdentityJudgement(frozenset(ids), frozenset(), False, distances, tuple(groups))


def _largest_group(
    ids: Sequence[str], embeddings: Mapping[str, Sequence[float]], max_distance: float
) -> tuple[frozenset[str], list[float]]:
    """The group around the best-connected face of ``ids`` (sorted), and its mean."""
    dist = {
        (a, b): embedding_distance(embeddings[a], embeddings[b]) for a in ids for b in ids
        if a < b
    }

    def d(a: str, b: str) -> float:
        return 0.0 if a == b else dist[(a, b) if a < b else (b, a)]

    def rank(i: str) -> tuple[int, float, str]:
        near = [d(i, j) for j in ids if d(i, j) < max_distance]
        return (-len(near), sum(near), i)

    anchor = min(ids, key=rank)
    around = [j for j in ids if d(anchor, j) < max_distance]
    centre = _mean([embeddings[j] for j in around])
    group = frozenset(j for j in ids if embedding_distance(embeddings[j], centre) < max_distance)
    return (group or frozenset({anchor})), centre


def _mean(vectors: Sequence[Sequence[float]]) -> list[float]:
    n = len(vectors)
    return [sum(values) / n for values in zip(*vectors, strict=True)]


#: Most photo names one message lists, and most characters of each.
_MAX_NAMED: Final = 8
_NAME_CHARS: Final = 40


def mixed_people_problem(
    images: Mapping[str, Mapping[str, Any]], *, max_distance: float = SAME_PERSON_MAX_DISTANCE
) -> str | None:
    """What to fix when an actor's accepted photos are not one person, else None.

    ``images`` are the actor's image records (``schema.ImageField`` keys); only
    accepted ones with an embedding take part. Job intake calls this once more
    before training, whatever the verdicts said when the photos arrived.
    """
    from actorgen.faces import embedding_from_record
    from actorgen.schema import ImageField, ImageStatus, quote

    accepted = {
        key: emb for key, record in images.items()
        if isinstance(record, Mapping) and record.get(ImageField.STATUS) == ImageStatus.ACCEPTED
        and (emb := embedding_from_record(record)) is not None
    }
    judged = judge_identity(accepted, max_distance=max_distance)

    def names(keys: Iterable[str]) -> str:
        found = sorted(str(images[k].get(ImageField.FILE_NAME) or k) for k in keys)
        more = len(found) - _MAX_NAMED
        # File names are the user's: each is quoted and cut short.
        return ", ".join(quote(n, _NAME_CHARS) for n in found[:_MAX_NAMED]) + (
            f" and {more} more" if more > 0 else "")

    if judged.decisive and judged.outsiders:
        return (
            f"the photos {names(judged.outsiders)} show a different person from the other "
            f"{len(judged.members)}; remove them (or replace them with photos of the person)"
        )
    if not judged.decisive and len(judged.groups) > 1:
        people = "; ".join(f"({names(group)})" for group in judged.groups)
        return (
            f"the accepted photos show {len(judged.groups)} different people: {people}; keep "
            "the photos of one person and remove the others"
        )
    return None
