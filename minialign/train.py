"""Where ``train.py``'s names live now (issue 19 dissolved it into ``minialign/runtime/``, one
module per idea): this module only re-exports them for the importers not yet moved.

    config   Config, TrainConfig, require, check_range, check_max_new_tokens, check_types, RUN_CONTROL
    flags    flag, field_comments, parse_bool, add_config_args, config_from_args
    devices  seed_everything, resolve_device, resolve_dtype, autocast, DTYPES, rng_state, set_rng_state
    optim    make_optimizer, lr_at, optimizer_step, accumulated_step, gradient_update, Update
    folders  partial_dir, command_line, config_changes, stage_model, input_path, stage_input,
             stage_problem, input_fingerprints, check_run_folder, STATUS, RESUME
    run      Run, Steps, DivergenceWarning, progress
    stage    stage, StageInterrupted
    plots    plot_panels, plot_scatter, plot_metrics, plot_metric_panels, standardise, running_mean
    loading  save_policy, load_policy, checkpoint_tokenizer
"""

# shim: old import path, removed once every importer uses minialign.runtime

from .model import GPT, load_checkpoint  # noqa: F401
from .runtime import distributed, files  # noqa: F401
from .runtime.config import (RUN_CONTROL, Config, TrainConfig, check_max_new_tokens, check_range,  # noqa: F401
                             check_types, require)
from .runtime.devices import (DTYPES, autocast, resolve_device, resolve_dtype, rng_state, seed_everything,  # noqa: F401
                              set_rng_state)
from .runtime.devices import valid_device_name as _device_ok  # noqa: F401
from .runtime.files import CheckpointError, ConfigError, NonFiniteError, StageError  # noqa: F401
from .runtime.flags import add_config_args, config_from_args, field_comments, flag, parse_bool  # noqa: F401
from .runtime.folders import (RESUME, STATUS, _alive, _finish_swap, check_run_folder, command_line,  # noqa: F401
                              config_changes, input_fingerprints, input_path, partial_dir, stage_input,
                              stage_model, stage_problem)
from .runtime.loading import checkpoint_tokenizer, load_policy, save_policy  # noqa: F401
from .runtime.optim import (Update, _clip_and_step, accumulated_step, gradient_update, lr_at,  # noqa: F401
                            make_optimizer, optimizer_step)
from .runtime.plots import _save, plot_metric_panels, plot_metrics, plot_panels, plot_scatter, running_mean, standardise  # noqa: F401,E501
from .runtime.run import _RUNS, DivergenceWarning, Run, Steps, _load_into, _state_of, progress  # noqa: F401
from .runtime.stage import StageInterrupted, _last_good, _stop_loops_on_ctrl_c, resume_hint, stage  # noqa: F401
from .runtime.stage import resume_hint as _resume_hint  # noqa: F401  (its old name)
from .tokenizer import Tokenizer  # noqa: F401
