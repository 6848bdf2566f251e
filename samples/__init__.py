"""The bundled, trained IFPruning sample: a tiny char-level Llama-style decoder whose four synthetic tasks
(addition, string reversal, digit sorting, bracket balance) use different FFN neurons, plus the sparsity
predictor that picks them. Build it with `python -m ifp_export.samples.train`, score it with
`python -m ifp_export.samples.evaluate`; the trained checkpoint lives in `samples/checkpoint/`.
"""
