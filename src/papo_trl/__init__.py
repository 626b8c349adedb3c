"""papo_trl: PAPO / GDPO / DAPO / DARO on top of TRL's GRPOTrainer (imports trl, transformers, openai)."""
