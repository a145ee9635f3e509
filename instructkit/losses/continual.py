"""The math of continual learning: penalties that resist forgetting, replay mixing, and the
metrics that measure forgetting. Pure functions of parameters, logits, masks, counts and
accuracy matrices; torch and the standard library only, so every formula is tested by hand.

A continual run trains tasks 0, 1, ..., T-1 in order. Three strategies keep earlier tasks alive:

* EWC, a quadratic pull towards the weights that solved earlier tasks, each weight's pull set by
  its diagonal Fisher information: Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting
  in neural networks", PNAS, Eq. 3.
* LwF, distilling the previous model's token distributions on the new task's inputs: Li and
  Hoiem 2017, "Learning without Forgetting", TPAMI, Eq. 2, with the T^2 scaling of Hinton et al.
  2015, "Distilling the Knowledge in a Neural Network", Sec. 2.
* Replay, mixing a fixed share of earlier tasks' examples into each epoch of the new task.

The metrics read an accuracy matrix ``R`` (T, T), ``R[i][j]`` the held-out metric on task j after
training task i: average accuracy, backward and forward transfer (Lopez-Paz and Ranzato 2017,
"Gradient Episodic Memory for Continual Learning", Sec. 2) and forgetting (Chaudhry et al. 2018,
"Riemannian Walk for Incremental Learning", Sec. 4.1). Indices here are 0-based; the papers'
are 1-based.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from fractions import Fraction

import torch

from instructkit.errors import InputError


def _float(x: torch.Tensor) -> torch.Tensor:
    """Upcast to fp32 or better: squared differences of bf16 weights underflow."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


# ----------------------------------------------------------------------------------------------
# EWC


def ewc_penalty(
    params: Mapping[str, torch.Tensor],
    anchor: Mapping[str, torch.Tensor],
    fisher: Mapping[str, torch.Tensor],
    lam: float,
) -> torch.Tensor:
    """EWC's penalty (Kirkpatrick et al. 2017, Eq. 3): ``(lam / 2) * sum_i F_i (theta_i - theta*_i)^2``.

    The loss on the new task B becomes ``L_B(theta) + ewc_penalty(...)``, theta* the weights at
    the end of the earlier task A and F their diagonal Fisher (:func:`diagonal_fisher`). For more
    than one earlier task, add one penalty per task (the paper's "two separate penalties"), or
    merge them beforehand, since a sum of quadratic penalties is itself one.

    Args:
        params: name -> current weight, any shape, with grad.
        anchor: name -> theta*, the same shapes; treated as a constant.
        fisher: name -> F, the same shapes, F >= 0; treated as a constant. Only the names in
            ``fisher`` are penalised: weights it does not list (a new head, an adapter added
            for task B) move freely.
        lam: lambda, how much task A matters relative to task B.

    Returns:
        Scalar penalty in fp32 or wider (0 when ``fisher`` is empty).

    Raises:
        ValueError: a name in ``fisher`` missing from ``params`` or ``anchor``, or shapes that differ.
    """
    terms = []
    for name, f in fisher.items():
        if name not in params or name not in anchor:
            where = "params" if name not in params else "anchor"
            raise ValueError(f"EWC: fisher has {name!r} but {where} does not")
        theta, star = params[name], anchor[name]
        if not theta.shape == star.shape == f.shape:
            raise ValueError(
                f"EWC: {name!r} has shapes {tuple(theta.shape)} (params), {tuple(star.shape)} (anchor), "
                f"{tuple(f.shape)} (fisher)"
            )
        diff = _float(theta) - _float(star.detach())
        terms.append((_float(f.detach()) * diff.square()).sum())
    return 0.5 * lam * sum(terms) if terms else torch.zeros(())


def per_example_gradients(
    per_example_nll: torch.Tensor, params: Mapping[str, torch.Tensor]
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield ``{name: d nll_n / d theta}`` for each example n in turn, for :func:`diagonal_fisher`.

    One backward pass per example through the graph that produced ``per_example_nll``; the
    graph is freed after the last. A weight the example does not reach gets a zero gradient.

    Args:
        per_example_nll: (N,) negative log-likelihood of each example, differentiable w.r.t.
            ``params``. What an "example" is, is the caller's choice: for a sequence, the sum
            of its response tokens' NLL gives the sequence-level Fisher.
        params: name -> weight (requires grad).
    """
    names, tensors = list(params), list(params.values())
    n = per_example_nll.numel()
    for i, nll in enumerate(per_example_nll.reshape(-1)):
        grads = torch.autograd.grad(nll, tensors, retain_graph=i < n - 1, allow_unused=True)
        yield {k: torch.zeros_like(t) if g is None else g for k, t, g in zip(names, tensors, grads)}


def diagonal_fisher(per_example_grads: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Diagonal of the empirical Fisher: ``F_i = 1/N sum_n (d log p(y_n | x_n; theta) / d theta_i)^2``.

    The F of EWC (Kirkpatrick et al. 2017, Eq. 3), evaluated at theta* (the weights that end the
    earlier task, in eval mode). The sign of the gradient does not matter, so gradients of the
    NLL serve as well as those of the log-likelihood.

    Which Fisher this estimates is set by the labels the gradients were taken on:

    * observed labels y_n (the task's own targets, as :func:`per_example_gradients` of the
      training loss gives): the *empirical* Fisher, the estimator named above;
    * labels sampled from the model, y_n ~ p(. | x_n; theta*): a Monte-Carlo estimate of the
      *true* Fisher ``E_x E_{y ~ p_theta} [(d log p / d theta)^2]``, the Fisher information proper.

    The two coincide in expectation only where the model's predictive distribution is the
    data's, and can differ a lot elsewhere (Kunstner et al. 2019, "Limitations of the empirical
    Fisher approximation"). Squares must be of per-example gradients: squaring a batch's mean
    gradient gives a different, smaller quantity.

    Takes an iterable so that gradients can be streamed, and accumulates in fp32 or wider. Over
    many micro-batches: ``diagonal_fisher(itertools.chain.from_iterable(per_example_gradients(
    nll(batch), params) for batch in batches))`` holds one micro-batch's graph at a time.

    Args:
        per_example_grads: one dict per example, name -> gradient (each example the same names
            and shapes), e.g. :func:`per_example_gradients` or a loop of per-example backwards.

    Returns:
        name -> F, the shapes of the gradients, F >= 0.

    Raises:
        ValueError: no examples, or examples with different names.
    """
    sums: dict[str, torch.Tensor] = {}
    n = 0
    for grads in per_example_grads:
        if n and grads.keys() != sums.keys():
            raise ValueError(f"example {n} has gradients for {sorted(grads)}, the first for {sorted(sums)}")
        for name, g in grads.items():
            square = _float(g.detach()).square()
            sums[name] = sums[name] + square if n else square
        n += 1
    if n == 0:
        raise ValueError("diagonal_fisher needs at least one example")
    return {name: s / n for name, s in sums.items()}


# ----------------------------------------------------------------------------------------------
# LwF


def lwf_distillation(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """LwF's distillation term (Li and Hoiem 2017, Eq. 2): per masked token
    ``tau^2 * KL(softmax(teacher / tau) || softmax(student / tau))``, summed; tau = ``temperature``
    (the papers' T, renamed here so as not to clash with the T of the shapes).

    Eq. 2 is the cross-entropy ``-sum_v y'_v log yhat'_v`` between the old model's recorded
    probabilities and the current ones, both raised to 1/tau and renormalised, which is exactly
    ``softmax(logits / tau)``. The KL used here is that cross-entropy minus the teacher's entropy,
    a constant: the same gradient, and 0 when the student matches the teacher. The factor tau^2
    is Hinton et al. 2015, Sec. 2: the gradients of the softened term scale as 1/tau^2, so the
    product keeps its weight against the task loss when tau changes (LwF uses tau = 2).

    Gradient w.r.t. the student's logits at a token: ``tau * (softmax(s / tau) - softmax(t / tau))``.

    Args:
        student_logits: (B, T, V) the model being trained (with grad).
        teacher_logits: (B, T, V) the model as it was before this task, on the same inputs;
            treated as a constant. A -inf logit (a token the teacher never emits) is allowed.
        mask: (B, T) 1 (or True) where the distributions are distilled, e.g. the positions whose
            next token is trained; 0 elsewhere.
        temperature: tau > 0.

    Returns:
        (loss_sum, count): the scalar sum over masked positions (fp32 or wider) and their number,
        the engine's contract; divide by a count of the whole accumulated batch.

    Raises:
        ValueError: temperature <= 0, or shapes that do not match.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape or student_logits.shape[:2] != mask.shape:
        raise ValueError(
            f"shapes: student {tuple(student_logits.shape)}, teacher {tuple(teacher_logits.shape)}, "
            f"mask {tuple(mask.shape)}; expected (B, T, V), (B, T, V), (B, T)"
        )
    keep = mask.bool()
    # Only the distilled positions are normalised: (N, V), N = number of masked positions.
    log_s = torch.log_softmax(_float(student_logits[keep]) / temperature, dim=-1)
    log_t = torch.log_softmax(_float(teacher_logits.detach()[keep]) / temperature, dim=-1)
    p_t = log_t.exp()
    # Where the teacher gives a token probability 0 it contributes 0, not 0 * -inf.
    kl = torch.where(p_t > 0, p_t * (log_t - log_s), torch.zeros_like(p_t)).sum()
    return temperature**2 * kl, keep.sum()


# ----------------------------------------------------------------------------------------------
# Replay


def _check_fraction(fraction: float) -> None:
    if not 0.0 <= fraction < 1.0:  # also rejects NaN
        raise InputError(
            f"replay fraction must lie in [0, 1) (the share of each epoch taken from earlier tasks), got {fraction}",
            field="replay.fraction",
        )


def _cycled_permutations(n: int, rng: random.Random) -> Iterator[int]:
    """0..n-1 in a random order, then in a fresh random order, and so on without end."""
    while True:
        order = list(range(n))
        rng.shuffle(order)
        yield from order


def replay_schedule_by_tokens(
    new_tokens: Sequence[int], old_tokens: Sequence[int], fraction: float, *, seed: int
) -> list[int]:
    """One shuffled epoch: every new example once, plus earlier tasks' examples holding as close
    to ``fraction`` of the epoch's tokens as a whole number of examples allows.

    With N the new tokens, the exact amount of old tokens is ``O* = fraction * N / (1 - fraction)``
    (then ``O* / (N + O*) = fraction``). Old examples are taken in a seeded random order (a
    permutation of the old pool, then a fresh one if the pool runs out, so each old example is
    used at most once more than any other) until their tokens reach O*. Of the last two
    prefixes, the one just below O* and the one at or above it, the one whose share of tokens
    ``O / (N + O)`` is closer to ``fraction`` is kept; on a tie, the shorter (compared exactly,
    ``fraction`` taken as the decimal it prints as). The kept amount is therefore within one old
    example's tokens of O*. Choosing an arbitrary subset to hit O* exactly would be subset-sum,
    and would bias replay towards examples of convenient lengths.

    Args:
        new_tokens: (n_new,) token count of each of the new task's examples, all >= 1.
        old_tokens: (n_old,) token count of each example from earlier tasks, all >= 1.
        fraction: the share of tokens from earlier tasks, in [0, 1).
        seed: the same seed gives the same epoch (pass seed + epoch for a new mix each epoch).

    Returns:
        Indices into the concatenation ``[new..., old...]``: ``i < n_new`` is new example i,
        ``n_new + j`` is old example j. In random order.

    Raises:
        InputError: fraction outside [0, 1) (field ``replay.fraction``).
        ValueError: a token count below 1, or replay asked of an empty old pool.
    """
    _check_fraction(fraction)
    if any(t < 1 for t in new_tokens) or any(t < 1 for t in old_tokens):
        raise ValueError("every example needs at least one token")
    n_new, new_total = len(new_tokens), sum(new_tokens)
    rng = random.Random(seed)
    # Exact rationals, and the fraction as written (0.1 is 1/10, not the double nearest it): a
    # tie such as 4 new examples at 0.1 (0 of 4 and 1 of 5 are both 0.1 off) stays a tie.
    f = Fraction(repr(float(fraction)))
    target = f * new_total / (1 - f)

    def error(old: int) -> Fraction:
        total = new_total + old
        return abs(Fraction(old, total) - f) if total else Fraction(0)

    taken: list[int] = []
    old_total = 0
    if target > 0:
        if not old_tokens:
            raise ValueError("replay of earlier tasks was asked for, but there are no earlier examples")
        order = _cycled_permutations(len(old_tokens), rng)
        while old_total < target:
            taken.append(next(order))
            old_total += old_tokens[taken[-1]]
        if error(old_total - old_tokens[taken[-1]]) <= error(old_total):
            taken.pop()
    epoch = list(range(n_new)) + [n_new + j for j in taken]
    rng.shuffle(epoch)
    return epoch


def replay_schedule(n_new: int, n_old: int, fraction: float, *, seed: int) -> list[int]:
    """One shuffled epoch: every new example once, plus k examples from earlier tasks, k chosen
    so that their share ``k / (n_new + k)`` is as close to ``fraction`` as possible (on a tie,
    the smaller k).

    That k is the floor or the ceiling of ``fraction * n_new / (1 - fraction)``, and it satisfies
    ``k == round(fraction * (n_new + k))``: the old share of the epoch is exactly the rounded
    fraction of its length. This is :func:`replay_schedule_by_tokens` with every example one
    token long; the sampling of old examples (a seeded permutation, cycled if k > n_old) is the
    same.

    Args:
        n_new: examples of the new task.
        n_old: examples from earlier tasks (the replay pool).
        fraction: the share of the epoch from earlier tasks, in [0, 1).
        seed: the same seed gives the same epoch.

    Returns:
        Indices into ``[new..., old...]``, as :func:`replay_schedule_by_tokens`.

    Raises:
        InputError: fraction outside [0, 1) (field ``replay.fraction``).
        ValueError: replay asked of an empty old pool.
    """
    return replay_schedule_by_tokens([1] * n_new, [1] * n_old, fraction, seed=seed)


# ----------------------------------------------------------------------------------------------
# Metrics over the accuracy matrix


def _matrix(R: Sequence[Sequence[float]], min_tasks: int) -> list[list[float]]:
    rows = [[float(x) for x in row] for row in R]
    n = len(rows)
    if any(len(row) != n for row in rows):
        raise ValueError(f"the accuracy matrix must be square (T, T); got rows of lengths {[len(r) for r in rows]}")
    if n < min_tasks:
        raise ValueError(f"needs an accuracy matrix of at least {min_tasks} tasks, got {n}")
    return rows


def average_accuracy(R: Sequence[Sequence[float]]) -> float:
    """ACC (Lopez-Paz and Ranzato 2017, Sec. 2): ``1/T sum_j R[T-1][j]``, the mean over all tasks
    after training the last one. (Chaudhry et al. 2018's A_k is the same for k = T.)

    Args:
        R: (T, T) accuracy matrix, ``R[i][j]`` the metric on task j after training task i.
    """
    rows = _matrix(R, 1)
    return sum(rows[-1]) / len(rows)


def backward_transfer(R: Sequence[Sequence[float]]) -> float:
    """BWT (Lopez-Paz and Ranzato 2017, Sec. 2): ``1/(T-1) sum_{j < T-1} (R[T-1][j] - R[j][j])``.

    How the later tasks changed each earlier task, measured from the moment it was learned.
    Negative is forgetting; positive, later tasks helped.

    Args:
        R: (T, T) accuracy matrix, T >= 2.
    """
    rows = _matrix(R, 2)
    T = len(rows)
    return sum(rows[T - 1][j] - rows[j][j] for j in range(T - 1)) / (T - 1)


def forgetting(R: Sequence[Sequence[float]]) -> tuple[list[float], float]:
    """Forgetting (Chaudhry et al. 2018, Sec. 4.1) after the last task, per earlier task and its mean.

    ``f_j = max_{l < T-1} R[l][j] - R[T-1][j]`` for each j < T-1, and ``F = 1/(T-1) sum_j f_j``.
    Unlike BWT, the reference is the best the task ever was, not its value just after it was
    learned. As in the paper the max runs over every earlier row, including rows l < j from
    before task j was trained, so a task the model once did better zero-shot counts that too.

    Args:
        R: (T, T) accuracy matrix, T >= 2.

    Returns:
        ([f_0, ..., f_{T-2}], F).
    """
    rows = _matrix(R, 2)
    T = len(rows)
    per_task = [max(rows[i][j] for i in range(T - 1)) - rows[T - 1][j] for j in range(T - 1)]
    return per_task, sum(per_task) / len(per_task)


def forward_transfer(R: Sequence[Sequence[float]], baseline: Sequence[float]) -> float:
    """FWT (Lopez-Paz and Ranzato 2017, Sec. 2): ``1/(T-1) sum_{j >= 1} (R[j-1][j] - b[j])``.

    How training on the tasks before j moved task j before it was trained, against ``b[j]``, the
    metric on task j of the model the run started from (the paper uses a random initialisation;
    for fine-tuning, the base model).

    Args:
        R: (T, T) accuracy matrix, T >= 2.
        baseline: (T,) b; b[0] is not used.
    """
    rows = _matrix(R, 2)
    T = len(rows)
    if len(baseline) != T:
        raise ValueError(f"baseline has {len(baseline)} entries, the accuracy matrix {T} tasks")
    return sum(rows[j - 1][j] - float(baseline[j]) for j in range(1, T)) / (T - 1)
