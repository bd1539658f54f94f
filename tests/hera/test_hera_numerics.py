"""mutual_knn and hera_loss_anchored against slow loop references written straight from the formulas."""

import math

import pytest
import torch

from llamafactory_hera.hera.loss import hera_loss_anchored
from llamafactory_hera.hera.metrics import mutual_knn


def _loop_knn(feats: torch.Tensor, k: int) -> list[set[int]]:
    rows = [[float(v) for v in r] for r in feats.double()]
    norms = [math.sqrt(sum(v * v for v in r)) for r in rows]
    unit = [[v / n for v in r] for r, n in zip(rows, norms, strict=True)]
    out = []
    for i, ui in enumerate(unit):
        sims = [(sum(a * b for a, b in zip(ui, uj, strict=True)), j) for j, uj in enumerate(unit) if j != i]
        sims.sort(key=lambda s: -s[0])
        out.append({j for _, j in sims[:k]})
    return out


def _loop_mutual_knn(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    knn_a, knn_b = _loop_knn(a, k), _loop_knn(b, k)
    return sum(len(x & y) / k for x, y in zip(knn_a, knn_b, strict=True)) / len(knn_a)


def hera_loss(student: torch.Tensor, teacher: torch.Tensor, k: int, temperature: float | torch.Tensor = 0.07,
              similarity: str = "cosine") -> torch.Tensor:
    """Paper Eq. 4 averaged over the batch (and heads) of ``student`` ``[B, D]`` or ``[H, B, D]``: every sample an
    anchor among all of them, as the training step's anchored loss with the batch as its candidates."""
    heads = student.unsqueeze(0) if student.ndim == 2 else student
    index = torch.arange(heads.shape[1])
    return hera_loss_anchored(heads, heads, index, teacher, teacher, k, temperature, similarity).mean()


def _loop_hera(student: torch.Tensor, teacher: torch.Tensor, k: int, tau: float, cosine: bool) -> float:
    heads = student if student.ndim == 3 else student[None]
    neighbours = _loop_knn(teacher, k)
    per_head = []
    for m in heads.double():
        rows = [[float(v) for v in r] for r in m]
        if cosine:
            rows = [[v / math.sqrt(sum(x * x for x in r)) for v in r] for r in rows]
        total = 0.0
        for i, ri in enumerate(rows):
            s = {z: sum(a * b for a, b in zip(ri, rz, strict=True)) / tau for z, rz in enumerate(rows) if z != i}
            log_denominator = math.log(sum(math.exp(v) for v in s.values()))
            total += -sum(s[j] - log_denominator for j in neighbours[i]) / k
        per_head.append(total / len(rows))
    return sum(per_head) / len(per_head)


@pytest.mark.parametrize("n,k", [(12, 1), (20, 5), (31, 10)])
def test_mutual_knn_matches_loop(n: int, k: int) -> None:
    gen = torch.Generator().manual_seed(n)
    a, b = torch.randn(n, 7, generator=gen), torch.randn(n, 5, generator=gen)
    assert mutual_knn(a, b, k) == pytest.approx(_loop_mutual_knn(a, b, k), abs=1e-6)


def test_mutual_knn_hand_worked() -> None:
    # Unit vectors at angles 0, 0.1, 1.5, 1.6: nearest-neighbour pairs {0,1} and {2,3}.
    angles = torch.tensor([0.0, 0.1, 1.5, 1.6])
    a = torch.stack([angles.cos(), angles.sin()], 1)
    # Same pairs {0,1} and {2,3} on side B, different pairs {0,2}, {1,3} on side C.
    b = a.clone()
    c = torch.stack([torch.tensor([0.0, 1.5, 0.1, 1.6]).cos(), torch.tensor([0.0, 1.5, 0.1, 1.6]).sin()], 1)
    assert mutual_knn(a, b, 1) == 1.0
    assert mutual_knn(a, c, 1) == 0.0


def test_mutual_knn_is_scale_invariant_and_symmetric() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, 4, generator=gen), torch.randn(16, 6, generator=gen)
    assert mutual_knn(a * 7.0, b, 3) == mutual_knn(a, b, 3) == mutual_knn(b, a, 3)


@pytest.mark.parametrize("shape", [(12, 6), (3, 12, 6)])
@pytest.mark.parametrize("cosine", [True, False])
def test_hera_loss_matches_loop(shape: tuple[int, ...], cosine: bool) -> None:
    gen = torch.Generator().manual_seed(len(shape))
    student = torch.randn(*shape, generator=gen) * (1.0 if cosine else 0.3)
    teacher = torch.randn(shape[-2], 9, generator=gen)
    got = hera_loss(student, teacher, k=4, temperature=0.5 if not cosine else 0.07,
                    similarity="cosine" if cosine else "dot")
    want = _loop_hera(student, teacher, 4, 0.5 if not cosine else 0.07, cosine)
    assert float(got) == pytest.approx(want, rel=1e-5)


def test_hera_loss_hand_worked_three_points() -> None:
    # B=3, k=1, tau=1, cosine on unit vectors at 0, 90 and 180 degrees.
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # Teacher: 0 and 1 are neighbours; 2's nearest is 1.
    teacher = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    # i=0: sims to 1,2 = 0,-1 -> -log(e^0/(e^0+e^-1)); i=1: sims to 0,2 = 0,0 -> log 2;
    # i=2: sims to 0,1 = -1,0 -> target 1 -> -log(e^0/(e^-1+e^0)).
    expected = (math.log(1 + math.exp(-1)) * 2 + math.log(2)) / 3
    assert float(hera_loss(student, teacher, k=1, temperature=1.0)) == pytest.approx(expected, rel=1e-6)


def test_hera_loss_gradient_reaches_student_and_temperature() -> None:
    gen = torch.Generator().manual_seed(3)
    student = torch.randn(2, 11, 8, generator=gen, requires_grad=True)
    log_tau = torch.tensor(math.log(0.07), requires_grad=True)
    hera_loss(student, torch.randn(11, 5, generator=gen), k=10, temperature=log_tau.exp()).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert log_tau.grad is not None and log_tau.grad != 0


def test_hera_loss_rejects_small_batches_and_unknown_similarities() -> None:
    with pytest.raises(ValueError, match="k=10 needs"):
        hera_loss(torch.randn(10, 4), torch.randn(10, 3), k=10)
    with pytest.raises(ValueError, match="similarity must be"):
        hera_loss(torch.randn(12, 4), torch.randn(12, 3), k=2, similarity="euclid")


def test_per_sample_features_average_each_samples_images() -> None:
    from llamafactory_hera.hera.teacher import per_sample_features

    feats = torch.arange(12, dtype=torch.float32).reshape(4, 3)  # 4 images
    counts = torch.tensor([1, 0, 3])  # sample 0: image 0; sample 1: none; sample 2: images 1..3
    got = per_sample_features(feats, counts)
    unit = [row / row.norm() for row in feats]  # each image's feature L2-normalised before the average
    want = torch.stack([unit[0], torch.zeros(3), (unit[1] + unit[2] + unit[3]) / 3])
    torch.testing.assert_close(got, want)


def test_pooled_token_mask_modes() -> None:
    from llamafactory_hera.heads.pooling import pooled_token_mask, pooling_weights

    labels = torch.tensor([[-100, -100, 7, 8, -100]])  # the labelled image token: train_on_prompt
    input_ids = torch.tensor([[1, 99, 99, 5, 0]])  # 99 = image token; last position is padding
    attention = torch.tensor([[1, 1, 1, 1, 0]])
    assistant = pooled_token_mask(labels, input_ids, attention, "assistant", 99)
    text = pooled_token_mask(labels, input_ids, attention, "text", 99)
    assert assistant.tolist() == [[False, False, False, True, False]]  # image tokens never, even with a label
    assert text.tolist() == [[False, False, False, True, False]]  # nothing before the image can depend on it
    assert pooling_weights(text).tolist() == [[0.0, 0.0, 0.0, 1.0, 0.0]]
    assert pooling_weights(torch.zeros(1, 3, dtype=torch.bool)).tolist() == [[0.0, 0.0, 0.0]]


def _loop_anchored(anchors, candidates, anchor_index, t_anchor, t_cand, k, tau) -> list[float]:
    """Per-anchor loss straight from Eq. 4, candidates = current batch and/or queue, cosine similarity."""
    def unit(rows):
        return [[v / math.sqrt(sum(x * x for x in r)) for v in r] for r in rows]

    def dot(u, v):
        return sum(x * y for x, y in zip(u, v, strict=True))

    ta, tc = unit(t_anchor.double().tolist()), unit(t_cand.double().tolist())
    out = []
    for i in range(anchors.shape[1]):
        others = [j for j in range(candidates.shape[1]) if j != int(anchor_index[i])]
        neighbours = sorted(others, key=lambda j: -dot(ta[i], tc[j]))[:k]
        per_head = []
        for h in range(anchors.shape[0]):
            a = unit([anchors[h, i].double().tolist()])[0]
            cands = unit(candidates[h].double().tolist())
            s = {j: dot(a, cands[j]) / tau for j in others}
            log_z = math.log(sum(math.exp(v) for v in s.values()))
            per_head.append(-sum(s[j] - log_z for j in neighbours) / k)
        out.append(sum(per_head) / len(per_head))
    return out


def test_anchored_loss_with_a_hand_built_queue_matches_the_loop() -> None:
    gen = torch.Generator().manual_seed(7)
    heads, batch, queue, dim, edim, k = 2, 3, 9, 5, 4, 4  # 3 samples in the micro-batch: too few for k=4 alone
    current, queued = torch.randn(heads, batch, dim, generator=gen), torch.randn(heads, queue, dim, generator=gen)
    t_current, t_queued = torch.randn(batch, edim, generator=gen), torch.randn(queue, edim, generator=gen)
    candidates, t_cand = torch.cat([current, queued], 1), torch.cat([t_current, t_queued])
    got = hera_loss_anchored(current, candidates, torch.arange(batch), t_current, t_cand, k, 0.3)
    want = _loop_anchored(current, candidates, torch.arange(batch), t_current, t_cand, k, 0.3)
    assert all(math.isfinite(v) for v in got.tolist())
    assert got.tolist() == pytest.approx(want, rel=1e-5)


def test_anchored_loss_breaks_teacher_ties_of_reused_images_towards_the_lower_index() -> None:
    """Reused images: candidates 0-1, 2-4 and 5-6 share a teacher feature (one-hot, so every similarity is exactly 0
    or 1 and the k-th place is a tie); the loop's stable sort picks the lower indices, and so must the loss."""
    gen = torch.Generator().manual_seed(9)
    image_of = [0, 0, 1, 1, 1, 2, 2, 3, 4]
    teacher = torch.eye(5)[image_of]
    candidates = torch.randn(2, len(image_of), 6, generator=gen)
    anchor_index = torch.tensor([0, 3, 5])
    anchors = candidates[:, anchor_index]
    for k in (2, 3, 5):
        got = hera_loss_anchored(anchors, candidates, anchor_index, teacher[anchor_index], teacher, k, 0.2)
        want = _loop_anchored(anchors, candidates, anchor_index, teacher[anchor_index], teacher, k, 0.2)
        assert got.tolist() == pytest.approx(want, rel=1e-5), k
    every = torch.arange(len(image_of))
    whole = hera_loss_anchored(candidates, candidates, every, teacher, teacher, 3, 0.2)
    assert whole.tolist() == pytest.approx(_loop_anchored(candidates, candidates, every, teacher, teacher, 3, 0.2),
                                           rel=1e-5)


@pytest.mark.parametrize("queued", [0, 5])
def test_anchored_loss_shortcuts_give_the_explicit_paths_values(queued: int) -> None:
    """The step's shortcuts compute the same numbers: ``anchor_index`` None (the anchors are the first candidates)
    against their explicit positions, and candidates (and their teacher features) that are the anchors themselves,
    normalised once, against equal copies normalised apart; with a queue after the anchors, and without."""
    gen = torch.Generator().manual_seed(11)
    anchors = torch.randn(3, 6, 5, generator=gen, requires_grad=True)
    teacher = torch.randn(6, 4, generator=gen)
    queue, queue_teacher = torch.randn(3, queued, 5, generator=gen), torch.randn(queued, 4, generator=gen)
    candidates = torch.cat([anchors, queue], 1) if queued else anchors
    candidate_teacher = torch.cat([teacher, queue_teacher]) if queued else teacher
    tau = torch.tensor(0.2, requires_grad=True)
    got = hera_loss_anchored(anchors, candidates, None, teacher, candidate_teacher, 3, tau)
    copies = (candidates.clone(), candidate_teacher.clone())  # other tensors: each side normalised on its own
    want = hera_loss_anchored(anchors, *copies[:1], torch.arange(6), teacher, copies[1], 3, tau)
    assert torch.equal(got, want)
    got_grads = torch.autograd.grad(got.sum(), (anchors, tau))
    want_grads = torch.autograd.grad(want.sum(), (anchors, tau))
    for mine, theirs in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-7)


def test_step_sums_read_what_each_micro_batch_added() -> None:
    """``StepSums`` keeps each micro-batch's device values and sums them at the read (and every ``FOLD_AT``
    micro-batches): the LM losses over their divisors, the finite terms, their count, the skipped ones, and lambda x
    term / steps, as a loop over the micro-batches gives them (70 micro-batches: one fold on the way)."""
    from llamafactory_hera.hera.step_sums import FOLD_AT, StepSums

    sums = StepSums(torch.device("cpu"))
    gen = torch.Generator().manual_seed(5)
    want = {"lm": 0.0, "hera": 0.0, "hera_micro": 0.0, "skipped": 0.0, "weighted": 0.0}
    for i in range(FOLD_AT + 6):
        lm, steps = torch.rand((), generator=gen) * 3, 8 if i < 40 else 3  # a short last accumulation
        term = None if i % 7 == 0 else torch.rand((), generator=gen)
        finite = None if term is None else torch.tensor(i % 5 != 1)
        if term is not None and not finite:
            term = torch.zeros(())  # what the step keeps of a non-finite term
        sums.add(lm, steps if i % 2 else 1, term, finite, (0.01, steps), [1.0, 0.0, 1.0, float(term is None),
                                                                          float(term is not None)])
        want["lm"] += float(lm) / (steps if i % 2 else 1)
        if term is not None:
            want["hera"] += float(term)
            want["hera_micro"] += float(finite)
            want["skipped"] += 1.0 - float(finite)
            want["weighted"] += 0.01 * float(term) / steps
    values, world = sums.read(torch.tensor(math.log(0.07)), reduce=False)
    assert world == 1 and values["micro"] == FOLD_AT + 6 and values["attempts"] == FOLD_AT + 6 - 10
    assert {key: values[key] for key in want} == pytest.approx(want, rel=1e-6)
    assert sums.nonfinite == want["skipped"] and sums.with_term == want["hera_micro"]
