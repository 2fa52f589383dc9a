"""Drop-ins of exgrpo_kernels for other GRPO trainers (TRL, verl, OpenRLHF). Each peer is imported only when
its drop-in is used."""
