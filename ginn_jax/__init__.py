"""ginn_jax: integrity-verified training on untrusted accelerators (GINN), in JAX.

A trusted runtime (a CPU device standing in for the TEE) orders every step,
authenticates the untrusted worker's gradient report, clips and applies the
update itself, and re-computes a secret random sample of steps. See
docs/design.md in the project for the protocol.

Importing ginn_jax before jax gives the process two CPU devices (worker and
trusted) unless ``XLA_FLAGS`` already sets a device count or
``GINN_JAX_KEEP_XLA_FLAGS=1`` is set.
"""
import os as _os
import sys as _sys

if (
    "jax" not in _sys.modules
    and "xla_force_host_platform_device_count" not in _os.environ.get("XLA_FLAGS", "")
    and not _os.environ.get("GINN_JAX_KEEP_XLA_FLAGS")
):
  _os.environ["XLA_FLAGS"] = (
      _os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
  ).strip()

# Boundary messages.
from ginn_jax._src.boundary import GradientReport
from ginn_jax._src.boundary import ProjectionRequest
from ginn_jax._src.boundary import Projections
from ginn_jax._src.boundary import Witness
from ginn_jax._src.boundary import WitnessRequest
from ginn_jax._src.boundary import WorkOrder
# Errors.
from ginn_jax._src.errors import DtypeMismatch
from ginn_jax._src.errors import GinnError
from ginn_jax._src.errors import IntegrityViolation
from ginn_jax._src.errors import MalformedReport
from ginn_jax._src.errors import NonFiniteReport
from ginn_jax._src.errors import ProcessDisagreement
from ginn_jax._src.errors import ProjectionViolation
from ginn_jax._src.errors import ReportRejected
from ginn_jax._src.errors import RuntimeHalted
from ginn_jax._src.errors import ShapeMismatch
from ginn_jax._src.errors import StepMismatch
from ginn_jax._src.errors import StructureMismatch
from ginn_jax._src.errors import WitnessViolation
# Data and models.
from ginn_jax._src.data import Dataset
from ginn_jax._src.data import DatasetNotFoundError
from ginn_jax._src.data import check_data
from ginn_jax._src.data import dataset_digest
from ginn_jax._src.data import list_datasets
from ginn_jax._src.data import load_dataset
from ginn_jax._src.models import get_model
from ginn_jax._src.models import list_models
from ginn_jax._src.models import Model
from ginn_jax._src import layered
from ginn_jax._src.layered import LayeredModule
from ginn_jax._src.types import Batch
# Witness plans: the products of a step's own gradient program.
from ginn_jax._src.program import UnsupportedProgram
from ginn_jax._src.program import witness_plan
from ginn_jax._src.program import WitnessPlan
# Your own model: any pure loss, flax linen or flax NNX.
from ginn_jax._src.pure import from_linen
from ginn_jax._src.pure import from_nnx
from ginn_jax._src.pure import NNXModel
from ginn_jax._src.pure import NonPureModelError
from ginn_jax._src.pure import PureModel
# Fine-tuning: a frozen base, trained adapters or leaves.
from ginn_jax._src.finetune import FineTuneModel
from ginn_jax._src.finetune import freeze
from ginn_jax._src.finetune import load_frozen
from ginn_jax._src.finetune import lora
from ginn_jax._src.finetune import save_frozen
# Devices and the shared gradient function.
from ginn_jax._src.devices import trusted_device
from ginn_jax._src.devices import worker_device
from ginn_jax._src.devices import worker_devices
from ginn_jax._src.step import compute_grads
from ginn_jax._src.step import gather
# Trusted runtime.
from ginn_jax._src.trusted.runtime import apply_update
from ginn_jax._src.trusted.runtime import init_state
from ginn_jax._src.trusted.runtime import ProtocolConfig
from ginn_jax._src.trusted.runtime import TrainState
from ginn_jax._src.trusted.runtime import TranscriptEntry
from ginn_jax._src.trusted.runtime import TrustedRuntime
from ginn_jax._src.trusted.transforms import make_update_transform
from ginn_jax._src.trusted.transforms import OptimizerConfig
from ginn_jax._src.trusted.transforms import OptimizerSpec
from ginn_jax._src.trusted.verify import Tolerance
from ginn_jax._src.trusted.verify import PAPER_PROTOTYPE_TOLERANCE
from ginn_jax._src.trusted.verify import LOOSE_PER_LEAF_TOLERANCE
from ginn_jax._src.trusted.verify import DEFAULT_WITNESS_FLOOR
# Workers.
from ginn_jax._src.worker.honest import HonestWorker
from ginn_jax._src.worker.honest import Worker
from ginn_jax._src.worker.sharded import ShardedWorker
from ginn_jax._src import shards
from ginn_jax._src.worker.malicious import BackdoorWorker
from ginn_jax._src.worker import schedules
from ginn_jax._src.triggers import BlendTrigger
from ginn_jax._src.triggers import PatchTrigger
from ginn_jax._src.worker.malicious import Backdoor
from ginn_jax._src.worker.malicious import MaliciousWorker
from ginn_jax._src.worker.malicious import PoisonWorker
from ginn_jax._src.worker.attacks import CombinedLossWorker
from ginn_jax._src.worker.attacks import LabelFlipWorker
from ginn_jax._src.worker.attacks import make_backdoored_params
from ginn_jax._src.worker.attacks import ModelReplacementWorker
from ginn_jax._src.worker.attacks import NoiseWorker
from ginn_jax._src.worker.attacks import ScaledBackdoorWorker
from ginn_jax._src.worker.attacks import StealthWorker
from ginn_jax._src.worker.attacks import ToleranceAwareWorker
from ginn_jax._src.worker.attacks import WitnessForgeryWorker
from ginn_jax._src.worker.aggregate_attacks import AggregateLiarWorker
from ginn_jax._src.worker.multihost import FollowResult
from ginn_jax._src.worker.multihost import MultiHostWorker
# Loop, calibration, metrics, analysis.
from ginn_jax._src.loop import train
from ginn_jax._src.loop import TrainResult
# Many hosts (jax.distributed).
from ginn_jax._src.distributed import agreement_fields
from ginn_jax._src.distributed import check_agreement
from ginn_jax._src.distributed import follow
from ginn_jax._src.distributed import global_worker_mesh
from ginn_jax._src.distributed import initialize as initialize_distributed
from ginn_jax._src.distributed import shutdown as shutdown_distributed
from ginn_jax._src.distributed import train_multihost
from ginn_jax._src.calibrate import Calibration
from ginn_jax._src.calibrate import calibrate_tolerance
from ginn_jax._src.calibrate import detect_precision
from ginn_jax._src.calibrate import Margin
from ginn_jax._src.calibrate import PrecisionReport
from ginn_jax._src.calibrate import SAFE_MARGIN
from ginn_jax._src.calibrate import tolerance_margin
from ginn_jax._src.calibrate import ToleranceMarginWarning
from ginn_jax._src.thresholds import lookup_thresholds
from ginn_jax._src.thresholds import StoredThreshold
from ginn_jax._src.metrics import accuracy
from ginn_jax._src.metrics import attack_success_rate
from ginn_jax._src.metrics import evaluate
from ginn_jax._src.metrics import robust_accuracy
from ginn_jax._src import analysis

__version__ = "0.1.0"
# Run directories: transcript, checkpoints, resume and audit.
from ginn_jax._src.audit import AuditItem
from ginn_jax._src.audit import AuditReport
from ginn_jax._src.audit import audit_run
from ginn_jax._src.rundir import RunResult
from ginn_jax._src.rundir import run_verified
from ginn_jax._src.trusted.transcript import read_transcript
from ginn_jax._src.trusted.transcript import TranscriptError
from ginn_jax._src.trusted.transcript import TranscriptWriter
# Language models: an offline corpus, a character tokenizer, an NNX transformer, a phrase backdoor.
from ginn_jax._src.text import decode as decode_text
from ginn_jax._src.text import encode as encode_text
from ginn_jax._src.text import pydoc_corpus
from ginn_jax._src.text import STDLIB_FILES
from ginn_jax._src.text import STDLIB_FILES_SHA256
from ginn_jax._src.text import stdlib_corpus
from ginn_jax._src.text import TextCorpus
from ginn_jax._src.text import VOCAB as TEXT_VOCAB
from ginn_jax._src.text import VOCAB_SIZE as TEXT_VOCAB_SIZE
from ginn_jax._src.text import windows as text_windows
from ginn_jax._src.text_backdoor import backdoor_success_rate
from ginn_jax._src.text_backdoor import PhraseBackdoor
from ginn_jax._src.transformer import DecoderLM
from ginn_jax._src.transformer import greedy_generate
from ginn_jax._src.transformer import lm_loss
from ginn_jax._src.transformer import make_decoder
from ginn_jax._src.transformer import perplexity
from ginn_jax._src.transformer import TransformerConfig
