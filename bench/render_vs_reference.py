"""Rendering speed side by side with the PyTorch reference renderer, on the same weights.

    python bench/render_vs_reference.py                 # base (135 M), float32, 500 notes
    python bench/render_vs_reference.py --model small --notes 200 --rounds 1

The reference renderer is the reference model (`tests/reference_t5gemma.py`: `transformers`'
T5Gemma with the note compression; `pip install -r requirements-reference.txt`) decoding with
`transformers`' ``generate`` (KV cache, one token per step) under a logits processor that
forces every note's pitch and keeps every other slot inside its id range, at the paper's
sampling (temperature 1, top-p 0.95). Ours is `pianist_jax.render.renderer.Renderer` on the same
weights converted with `pianist_jax.convert_hf`, at batch 1 and batch 8. Both render one
window of ``--notes`` notes of `render_bench.fixed_score`; compilation is excluded; rounds
alternate the two. Greedy renders of both (``--temperature 0``) are compared token by token.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from render_bench import cpu_name, fixed_score  # noqa: E402


def reference_renderer(module):
    """``render(score_ids, seed, greedy) -> ids`` with the reference model and ``generate``."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    from pianist_jax.tokenizer import BOS, RENDER_RANGES, TOKENS_PER_NOTE
    from tests import reference_t5gemma as ref

    class ScoreRules(LogitsProcessor):
        """Pitch forcing and the slots' id ranges (PAPER_NOTES section 4)."""

        def __init__(self, pitches: torch.Tensor):
            self.pitches = pitches

        def __call__(self, input_ids, scores):
            done = input_ids.shape[1] - 1  # tokens generated so far (after BOS)
            slot = done % TOKENS_PER_NOTE
            keep = torch.zeros_like(scores, dtype=torch.bool)
            if slot == 0:
                keep[:, self.pitches[done // TOKENS_PER_NOTE]] = True
            else:
                lo, hi = (int(v) for v in RENDER_RANGES[slot])
                keep[:, lo:hi] = True
            return scores.masked_fill(~keep, -float("inf"))

    @torch.no_grad()
    def render(score_ids: np.ndarray, seed: int, greedy: bool) -> np.ndarray:
        ids = torch.as_tensor(score_ids[None].astype(np.int64))
        pitches = ids[0, ::TOKENS_PER_NOTE]
        torch.manual_seed(seed)
        sampling = (
            {"do_sample": False}
            if greedy
            else {"do_sample": True, "temperature": 1.0, "top_p": 0.95, "top_k": 0}
        )
        out = module.generate(
            inputs_embeds=module.model.encoder.embeddings(ids),
            attention_mask=ref.note_mask(ids),
            decoder_input_ids=torch.full((1, 1), BOS),
            max_new_tokens=ids.shape[1],
            min_new_tokens=ids.shape[1],
            use_cache=True,
            logits_processor=LogitsProcessorList([ScoreRules(pitches)]),
            pad_token_id=0,
            eos_token_id=None,
            **sampling,
        )
        return out[0, 1:].numpy()

    return render


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="base", help="configs/model/<name>.yaml")
    p.add_argument("--notes", type=int, default=500, help="score notes (one window: <= 512)")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    if not 0 < args.notes <= 512:
        p.error("--notes must be 1..512 (one window)")
    try:
        import torch

        from tests import reference_t5gemma as ref
    except ImportError as err:
        sys.exit(
            f"error: the PyTorch reference is unavailable ({err}); "
            "pip install -r requirements-reference.txt"
        )
    import jax

    from pianist_jax.artifacts import convert_hf
    from pianist_jax.render.renderer import Renderer

    torch.set_num_threads(os.cpu_count() or 1)  # the test helper pins one thread
    score = fixed_score(args.notes)
    notes = len(score) // 8
    print(
        f"jax {jax.__version__}, torch {torch.__version__}, {os.cpu_count()} CPU threads; "
        f"CPU: {cpu_name()}; model {args.model}, float32, score {notes} notes"
    )
    with tempfile.TemporaryDirectory() as tmp:
        model_cfg = ref.model_cfg_from_yaml(f"model/{args.model}.yaml")
        module = ref.build_reference(model_cfg, seed=0)
        ref.save_reference(module, Path(tmp) / "hf", model_cfg)
        ours = Renderer(convert_hf.convert(Path(tmp) / "hf", Path(tmp) / "ours"))
        theirs = reference_renderer(module)

        greedy_ours = ours.render_ids([score], [0], temperature=0.0)[0]
        greedy_ref = theirs(score, 0, greedy=True)
        same = int(np.sum(greedy_ours == greedy_ref))
        first = np.nonzero(greedy_ours != greedy_ref)[0]
        print(
            f"greedy tokens identical: {same} / {len(score)}"
            + (f" (first difference at token {first[0]})" if len(first) else "")
        )
        for b in (1, 8):  # compile outside the timed rounds
            ours.render_ids([score] * b, list(range(b)))
        times = {"reference, batch 1": [], "pianist-jax, batch 1": [], "pianist-jax, batch 8": []}
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            theirs(score, 0, greedy=False)
            times["reference, batch 1"].append(notes / (time.perf_counter() - t0))
            for b in (1, 8):
                t0 = time.perf_counter()
                ours.render_ids([score] * b, list(range(b)))
                times[f"pianist-jax, batch {b}"].append(b * notes / (time.perf_counter() - t0))
    best = {k: max(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"{k:>22}: {best[k]:7.1f} notes/s (rounds: {', '.join(f'{x:.1f}' for x in v)})")
    ref1 = best["reference, batch 1"]
    print(
        f"pianist-jax batch 1 / reference: {best['pianist-jax, batch 1'] / ref1:.2f}x; "
        f"batch 8 / reference: {best['pianist-jax, batch 8'] / ref1:.2f}x; "
        f"batch 8 / batch 1: {best['pianist-jax, batch 8'] / best['pianist-jax, batch 1']:.2f}x"
    )


if __name__ == "__main__":
    main()
