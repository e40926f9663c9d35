"""Performance benchmark: ``python -m benchmark.perf [--quick] [--json PATH]``.

Measured in one process, on the CPU and on CUDA when available, as paired interleaved rounds (median of at
least 5 after warm-up, :mod:`benchmark.perf.timing`), with the run configuration the benchmark itself
resolves (runner), default the embedded CPU benchmark (``synth-10-5``, tiny engine, cpu schedule):

* ``engine_step_ratio_vs_transformers`` (goal <= 1.05): the engine's training iteration (SegModel forward,
  SetCriterion, backward, clipping, AdamW, poly schedule, through the real ``train_step_loop``) over
  transformers' ``Mask2FormerForUniversalSegmentation`` iteration with its own loss on the same weights,
  batch, loss settings (number of points included), optimiser groups, clipping and AMP.
* ``method_step_ratio_vs_finetune`` (goals <= 1.6, cisdq <= 2.0): each method's step-1 iteration over
  fine-tuning's, on the same step-1 batch, each method set up as the runner sets it up (old model frozen
  from a trained step 0, ``configure_model``, ``before_step``; CisDQ with its own step 0 and query groups).
* ``confusion_speedup_vs_torchmetrics`` (goal >= 2): torchmetrics ``MulticlassJaccardIndex`` accumulation time
  over ``benchmark.metrics.confusion_update``'s on the same 150-class 512 x 512 label maps.
* ``loader_to_train_throughput`` (goal >= 2): images/s of the step-0 ``TrainLoader`` with the configured
  workers over the images/s the engine's training iteration consumes.
* ``peak_memory_mib``: per case, measured in a subprocess each (:mod:`benchmark.perf.memory`).

The JSON holds exactly these five keys; each maps the device ("cpu", "cuda") to its value (a number, or
``{method: ratio}``, or ``{case: {"peak", "above_setup"}}``), so one file holds both devices of a run.

Timing decisions: a training iteration is timed between the trainer's consecutive batch requests, from
the second iteration of a fresh optimiser on (the first allocates AdamW's state); every timed call starts
from the same weights; no data loading is timed except in the loader case. Torch threads are set once
(``--threads``, default: the cores this process may use) and reported.
"""

from benchmark.perf.settings import PerfSettings, quick
from benchmark.perf.suite import PerfResult, run_perf

__all__ = ["PerfResult", "PerfSettings", "quick", "run_perf"]
