"""Training data: shard records, the pre-training and SFT pipelines, global batches, alignment.

`records` reads and writes the ArrayRecord shards that `data_prep` produces; `pipeline`
builds the Grain pipeline of packed, masked pre-training blocks (and hands SFT configs to
`sft`, which cuts aligned score/performance pairs into windows); `global_batches` turns
per-host batches into global arrays; `align` pairs score notes with performed notes.
"""
