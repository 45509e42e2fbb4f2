"""Judging renderings against human performances: the paper's pooled histograms
(`histograms`, also the command line), the note-level judge (`note_level`), the validation
set (`eval_set`), the aligner's own check (`aligner`), choosing decoding settings
(`choose_decoding`) and the score-signal diagnostics (`score_signal`).
`python -m pianist_jax.evaluate` runs `histograms.main`."""
