"""What every pipeline shares: settings (config: the one table of settings and their resolution), model
references (models, presets, hub), the checkpoint reader, the tensor plan (plan, meta, plancache), the dtype
table, sizes, the error hierarchy, and how signals and library output are handled (signals, logs).
Nothing here imports torch at module level."""
