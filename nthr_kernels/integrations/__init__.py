"""Trainer integrations. Importing this package imports neither TRL nor verl.

- :mod:`nthr_kernels.integrations.trl`: ``NTHRGRPOTrainer``, a ``trl.GRPOTrainer`` subclass
  (TRL: ``pip install -e ".[trl]"`` in a checkout, or ``make setup EXTRAS=dev,trl``).
- :mod:`nthr_kernels.integrations.verl`: the ``"nthr"`` advantage estimator for verl, usable without
  verl installed (the registration with verl's registry happens only when verl is importable).
- :mod:`nthr_kernels.integrations.lm_head`: the LM-head contract both apply (logits exactly ``W h``),
  importable without either.
"""
