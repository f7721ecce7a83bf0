"""Staging: what a freeze policy turns into, as plain data. Selectors -> stage plans -> param
groups (:mod:`.policy`), the optimizer over them (:mod:`.optim`), each stage's LR schedule
(:mod:`.schedule`), the stage table (:mod:`.summary`) and the penalties added to the loss
(:mod:`.regularize`). Only :func:`.policy.apply_stage` mutates ``requires_grad``."""
