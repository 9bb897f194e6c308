"""Where attention came from: an RNN encoder-decoder (GRU encoder, GRU decoder) with no
attention, Bahdanau's additive attention or Luong's multiplicative scores, a synthetic
task whose answer depends on every input token (reverse a sequence), and the experiment
that trains the variants on the same budget and measures accuracy against length.

* :mod:`.model` - :class:`Encoder`, :class:`Decoder`, :class:`Seq2Seq`;
* :mod:`.task` - the reversal task: batches, padding, exact-match accuracy;
* :mod:`.experiment` - train each variant, evaluate per length bucket.

Teaching code: small and explicit, one decoder step at a time, as the papers draw it.
"""

from .experiment import VARIANTS, Result, run_experiment, train_variant
from .model import Decoder, Encoder, Seq2Seq
from .task import ReverseTask

__all__ = ["Encoder", "Decoder", "Seq2Seq", "ReverseTask", "train_variant", "run_experiment",
           "Result", "VARIANTS"]
