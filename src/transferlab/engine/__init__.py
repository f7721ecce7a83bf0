"""The one staged engine: :func:`.stages.fit_stages` runs a freeze policy's stage plans, one
training pass (:func:`.epoch.train_epoch`) and one evaluation (:func:`.epoch.evaluate`) an
epoch, with everything around the step and the epoch as a hook (:mod:`.hooks`: EMA, early
stopping, LR logging, DDP; :mod:`.ledger`: the freeze ledger). Training runs and the LR
finder run on it."""
