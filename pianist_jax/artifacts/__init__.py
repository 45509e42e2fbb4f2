"""What training produces and what rendering reads: exported parameters (`export`), the
reference checkpoint importer (`convert_hf`) and the model card (`model_card`)."""
