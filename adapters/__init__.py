"""Adapter methods, one folder each (lora, sara, soda, spm, hipa, control), with a shared base and registry."""
