"""The library halves of the commands around training: evaluate, predict (and TTA), export,
features, the LR finder, compare, the sweep callback and its TensorBoard views. Each console
script (:mod:`transferlab.cli.args`) parses its arguments and calls one of these."""
