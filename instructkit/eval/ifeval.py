"""The ``ifeval`` suite: IFEval's verifiable instructions, strict and loose, on the benchmark's
own data format (``key``, ``prompt``, ``instruction_id_list``, ``kwargs``).

Responses are generated from the prompt as one user turn with the model's chat template, or
read from a ``--responses`` file (:mod:`instructkit.eval.responses`: every row is scored, so a
prompt may have several). The checks are :mod:`instructkit.verifiers.ifeval`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from instructkit.eval.responses import Answers, HeldOut, match_responses, with_source

if TYPE_CHECKING:
    from instructkit.eval.request import EvalRequest, Suite, SuiteRun


def run_ifeval(request: EvalRequest, suites: Sequence[Suite]) -> SuiteRun:
    """Prompt- and instruction-level accuracy over every response row, with a per-type breakdown.

    ``num_prompts`` counts the benchmark prompts; the accuracies are over all rows (with one
    response per prompt, the benchmark's own numbers). Each row's instruction verdicts go to
    its line of the samples file.
    """
    from instructkit.eval.request import SuiteRun
    from instructkit.verifiers import aggregate, evaluate_response, read_ifeval_jsonl

    # 1. The benchmark's prompts, and how a missing response names them.
    prompts = read_ifeval_jsonl(request.data)
    prompts = prompts[: request.limit] if request.limit else prompts
    names = [
        f"the prompt with key {p.key!r} of {request.data}"
        if p.key is not None
        else f"the prompt on line {p.line} of {request.data}"
        for p in prompts
    ]
    held = HeldOut(
        str(request.data), [None if p.key is None else str(p.key) for p in prompts], [p.prompt for p in prompts], names
    )

    # 2. The responses: every row of the file, or one generated per prompt.
    if request.responses is not None:
        answers = match_responses(request.responses, held)
    else:
        chats = [[{"role": "user", "content": p.prompt}] for p in prompts]
        answers = Answers.generated(request.generate(request.model_and_tokenizer(), chats))

    # 3. Every row checked against its prompt's instructions.
    results = [
        evaluate_response(prompts[r].prompt, text, prompts[r].instruction_id_list, prompts[r].kwargs)
        for r, text in zip(answers.records, answers.responses, strict=True)
    ]
    metrics = {**aggregate(results), "num_prompts": len(prompts)}
    rows = zip(answers.records, answers.responses, results, answers.sources, strict=True)
    samples = [
        with_source(
            {
                "suite": "ifeval",
                "key": prompts[r].key,
                "prompt": prompts[r].prompt,
                "response": text,
                "instruction_id_list": res["instruction_id_list"],
                "strict": res["strict"],
                "loose": res["loose"],
                "prompt_strict": res["prompt_strict"],
                "prompt_loose": res["prompt_loose"],
            },
            source,
        )
        for r, text, res, source in rows
    ]
    return SuiteRun(
        metrics, samples, str(request.data), len(prompts), generation=request.generation(), coverage=answers.coverage()
    )
