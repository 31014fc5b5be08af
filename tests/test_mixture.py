"""Task mixture: proportions, rank independence, resume, all-tasks mode, realised counts, MixedStream plumbing."""

from __future__ import annotations

import itertools
import json
import sys
from collections import Counter
from pathlib import Path

import pytest
from harness import run

from pretrain.data.mixture import MixedStream, TaskSampler, draws_before, task_probabilities

TASKS = ["cls", "det", "seg"]
ROOT = Path(__file__).resolve().parents[1]


def _freqs(sampler: TaskSampler, n: int = 5000) -> dict[str, float]:
    counts = Counter(sampler.task_for_step(s) for s in range(n))
    return {t: counts[t] / n for t in sampler.tasks}


@pytest.mark.parametrize("kw, expected", [
    ({"mode": "fixed", "weights": [2, 1, 1]}, {"cls": 0.5, "det": 0.25, "seg": 0.25}),
    ({"mode": "fixed", "weights": [1, 0, 3]}, {"cls": 0.25, "det": 0.0, "seg": 0.75}),
    ({"mode": "size", "sizes": [1_281_167, 118_287, 20_210]}, {"cls": 0.9024, "det": 0.0833, "seg": 0.0142}),
    ({"mode": "temperature", "sizes": [1_281_167, 118_287, 20_210], "temperature": 2.0},
     {"cls": 0.6996, "det": 0.2126, "seg": 0.0879}),
])
def test_realised_proportions_match_the_mode(kw: dict, expected: dict[str, float]) -> None:
    probs = task_probabilities(TASKS, **kw)
    assert probs == pytest.approx(expected, abs=1e-3)
    realised = _freqs(TaskSampler(TASKS, seed=11, **kw))
    assert realised == pytest.approx(expected, abs=0.02)  # 5000 draws: sd <= 0.007
    if expected["det"] == 0.0:
        assert realised["det"] == 0.0


def test_temperature_interpolates_between_size_and_uniform() -> None:
    sizes = [1000, 100, 10]
    p = [task_probabilities(TASKS, mode="temperature", sizes=sizes, temperature=t)["seg"] for t in (1.0, 3.0, 1e6)]
    assert p[0] == pytest.approx(10 / 1110) and p[0] < p[1] < p[2] and p[2] == pytest.approx(1 / 3, abs=1e-4)


@pytest.mark.parametrize("kw, match", [
    ({"weights": [1, -0.5, 1]}, "'det'"),
    ({"weights": [1, float("nan"), 1]}, "'det'"),
    ({"weights": [0, 0, 0]}, "zero"),
    ({"weights": [1, 1]}, "one value per task"),
    ({"mode": "size", "sizes": [10, -1, 3]}, "'det'"),
    ({"mode": "size"}, "sizes"),
    ({"mode": "temperature", "sizes": [1, 2, 3], "temperature": 0}, "temperature"),
    ({"mode": "bogus", "weights": [1, 1, 1]}, "bogus"),
])
def test_bad_sampling_arguments_raise(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TaskSampler(TASKS, **kw)


def test_same_task_on_every_rank_independent_of_process_and_hash_seed() -> None:
    kw = {"weights": [3, 2, 1], "seed": 5}
    here = [TaskSampler(TASKS, **kw).task_for_step(s) for s in range(300)]
    assert here == [TaskSampler(TASKS, **kw).task_for_step(s) for s in range(300)]
    code = ("import json; from pretrain.data.mixture import TaskSampler; "
            f"s = TaskSampler({TASKS!r}, weights=[3, 2, 1], seed=5); "
            "print(json.dumps([s.task_for_step(i) for i in range(300)]))")
    out = run([sys.executable, "-c", code], timeout=60, env={"PYTHONHASHSEED": "12345", "RANK": "3", "WORLD_SIZE": "4"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout) == here  # another "rank": other process, other string-hash seed, other env
    assert here != [TaskSampler(TASKS, weights=[3, 2, 1], seed=6).task_for_step(s) for s in range(300)]


def test_resumed_sampler_continues_the_uninterrupted_sequence_and_counts() -> None:
    full = TaskSampler(TASKS, weights=[1, 1, 1], seed=3)
    seq = [full.draw(s)[0] for s in range(200)]
    assert full.counts == dict(Counter(seq)) and sum(full.frequencies().values()) == pytest.approx(1.0)
    part = TaskSampler(TASKS, weights=[1, 1, 1], seed=3)
    for s in range(120):
        part.draw(s)
    resumed = TaskSampler(TASKS, weights=[1, 1, 1], seed=3)
    resumed.load_state_dict(part.state_dict())
    assert [resumed.draw(s)[0] for s in range(120, 200)] == seq[120:]
    assert resumed.counts == full.counts
    # what a partitioned stream resumes from: the draws before a step follow from the seed and the step alone
    assert draws_before(TaskSampler(TASKS, weights=[1, 1, 1], seed=3), 120) == part.counts
    every = TaskSampler(TASKS, weights=[1, 1, 1], seed=3, all_tasks=True)
    assert draws_before(every, 7) == dict.fromkeys(TASKS, 7)


class _FakeLoader:
    """Batches that record every argument the stream passed, so seeds/resume/per-task sizes are observable."""

    def __init__(self, task: str, **kw) -> None:
        self.task, self.kw = task, kw

    def __iter__(self):
        for i in itertools.count():
            yield {"task": self.task, "i": i, "skipped": 1 if i % 3 == 0 else 0, **self.kw}


def _stream(start_step: int = 0, *, sampler: TaskSampler | None = None, built: list | None = None) -> MixedStream:
    def make(task: str, **kw):
        if built is not None:
            built.append(task)
        return _FakeLoader(task, **kw)

    sampler = sampler or TaskSampler(TASKS, weights=[2, 1, 0], seed=9)
    kwargs = {"cls": {"batch_size": 64, "img_size": 224}, "det": {"batch_size": 2, "img_size": 512},
              "seg": {"batch_size": 4, "img_size": 512}}
    return MixedStream(sampler, kwargs, rank=1, world_size=2, num_workers=0, start_step=start_step,
                       make_loader=make)


def test_mixed_stream_pulls_only_the_chosen_task_with_its_own_batch_size() -> None:
    built: list[str] = []
    stream = _stream(built=built)
    got = list(itertools.islice(stream, 300))
    assert [s for s, _, _ in got] == list(range(300))
    assert all(batch["task"] == task for _, task, batch in got)
    assert sorted(set(built)) == ["cls", "det"]  # weight-0 seg never starts a loader
    assert {(b["task"], b["batch_size"], b["img_size"]) for _, _, b in got} == {("cls", 64, 224), ("det", 2, 512)}
    per_task = Counter(t for _, t, _ in got)
    assert [b["i"] for _, t, b in got if t == "det"] == list(range(per_task["det"]))  # consecutive pulls per task
    assert stream.sampler.counts == {"cls": per_task["cls"], "det": per_task["det"], "seg": 0}
    assert stream.skipped == {t: -(-per_task[t] // 3) for t in TASKS}  # 1 per 3 batches, as the loader reported
    assert all(b["seed"] == 9 and b["rank"] == 1 and b["start_step"] == 0 for _, _, b in got)


def test_mixed_stream_resume_reseeds_from_the_resume_step_and_is_repeatable() -> None:
    full = list(itertools.islice(_stream(), 100))
    first = _stream()
    list(itertools.islice(first, 60))
    first.restart()  # a periodic checkpoint at step 60
    state = first.state_dict()
    assert state["step"] == state["start_step"] == 60

    def resumed():
        stream = _stream(start_step=state["step"])
        stream.load_state_dict(state)
        return stream, list(itertools.islice(stream, 40))

    (s1, a), (_, b) = resumed(), resumed()
    assert [(s, t) for s, t, _ in a] == [(s, t) for s, t, _ in full[60:]]  # same task sequence as uninterrupted
    assert a == b  # resumed twice from the same step: identical batches
    assert all(batch["start_step"] == 60 for _, _, batch in a)  # loaders reseeded from the resume step
    assert s1.state_dict()["counts"] == _stream_counts(full)
    with pytest.raises(ValueError, match="start_step"):
        _stream(start_step=10).load_state_dict(state)


def _stream_counts(items: list) -> dict[str, int]:
    counts = Counter(t for _, t, _ in items)
    return {t: counts[t] for t in TASKS}


def test_all_tasks_mode_yields_one_batch_per_task_every_step() -> None:
    sampler = TaskSampler(TASKS, weights=[1, 1, 1], seed=0, all_tasks=True)
    got = list(itertools.islice(_stream(sampler=sampler), 5))
    assert all(task == "all" and [b["task"] for b in batches] == TASKS for _, task, batches in got)
    assert [b["i"] for b in got[-1][2]] == [4, 4, 4] and sampler.counts == {"cls": 5, "det": 5, "seg": 5}


def test_missing_loader_kwargs_for_a_task_is_an_error() -> None:
    with pytest.raises(ValueError, match="seg"):
        MixedStream(TaskSampler(TASKS, weights=[1, 1, 1]), {"cls": {}, "det": {}})


def test_resume_between_restarts_replays_to_the_same_batches_without_counting_twice() -> None:
    """Loaders restart at periodic checkpoints; a stop at any other step (a signal) resumes to the very batches the
    uninterrupted stream yields, and its counters are not inflated by the replayed steps."""
    uninterrupted = _stream()
    it = iter(uninterrupted)
    expected = [next(it) for _ in range(4)]
    uninterrupted.restart()  # the periodic checkpoint at step 4
    it = iter(uninterrupted)
    expected += [next(it) for _ in range(8)]
    cut = _stream()
    it = iter(cut)
    for _ in range(4):
        next(it)
    cut.restart()
    it = iter(cut)
    for _ in range(3):
        next(it)
    state = cut.state_dict()  # stopped by a signal after step 7
    assert (state["start_step"], state["step"]) == (4, 7)
    resumed = _stream(state["start_step"], sampler=TaskSampler(TASKS, weights=[2, 1, 0], seed=9))
    resumed.load_state_dict(state)
    after = list(itertools.islice(resumed, 5))
    assert [(s, t, b["i"], b["start_step"]) for s, t, b in after] == \
        [(s, t, b["i"], b["start_step"]) for s, t, b in expected[7:12]]
    tail = Counter(t for _, t, _ in expected[7:12])
    assert resumed.sampler.counts == {t: state["counts"][t] + tail[t] for t in TASKS}
