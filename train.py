"""Train HiFi-GAN: pretraining on ground-truth mels, or --finetune on teacher-forced Tacotron2 mels.

    accelerate launch train.py --experiment_name hifigan --working_directory work_dir \\
        --path_to_train_manifest data/train.csv --path_to_val_manifest data/test.csv

One CPU, one GPU, many GPUs or many nodes: all through `accelerate launch` and its configs.
Reads top to bottom: flags -> config -> data -> models -> optimisers -> resume -> loop -> checkpoints.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import hub
from dataset import MelDataset
from model import (
    PRESETS,
    SEGMENT_FRAMES,
    Generator,
    HifiGanConfig,
    MultiPeriodDiscriminator,
    MultiScaleDiscriminator,
    channels_last,
    from_official_names,
    full_precision,
    load_discriminators,
    load_generator,
    resolve_config,
    save_generator,
    train_step,
)
from training import (
    COMPLETE_MARKER,
    CudaGraphStep,
    RunControl,
    StepLog,
    add_run_flags,
    checkpoint_contents,
    complete_checkpoints,
    epoch_batches,
    log_media,
    make_accelerator,
    record_run,
    resume,
    setup_trackers,
    signal_safe_workers,
    start_trackers,
    state_files,
)
from utils import (
    HelpFormatter,
    UserError,
    add_config_flags,
    config_overrides,
    interleave_speakers,
    mel_spectrogram,
    run_cli,
)
from vocoding import vocode

VALIDATION_CHUNK_FRAMES = 1024  # about 12 s of 22 kHz audio per generator call


# ---------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    # The official recipe: 3100 epochs of LJSpeech at batch 16.
    add_run_flags(parser, training_epochs=3100, checkpoint_epochs=1, batch_size=16, learning_rate=2e-4)
    add = parser.add_argument
    add("--num_val_clips", type=int, default=None,
        help="validate on N clips only, spread over the speakers (default: all)")
    add("--mixed_precision", choices=["no", "bf16", "fp16"], default=None,
        help="default: what `accelerate launch`/`accelerate config` says (bf16 is the fast path)")
    add("--mixed_precision_networks", choices=["all", "discriminators"], default="all",
        help="the networks --mixed_precision applies to; 'discriminators' keeps the generator in fp32 (TF32 on a "
             "GPU): on an H200, bf16 everywhere ended 300 steps with a 35 %% higher mel L1 than fp32 (README: Speed)")
    add("--cuda_graphs", action=argparse.BooleanOptionalAction, default=True,
        help="on one GPU, replay each training step as one CUDA graph (V1 on an H200: 1.7-2.6x the steps/s of the "
             "same step launched op by op; see the README's speed table); not used under several processes, fp16 "
             "or --compile")
    add("--compile", action="store_true", help="torch.compile the generator and discriminators (inductor). Costly: "
        "on an H200 the first V1 step had not finished compiling after 170 s, and --cuda_graphs is faster")
    add("--no_tf32", action="store_true", help="keep fp32 matmuls/convs exact on Ampere+ GPUs (TF32 is on)")
    # Optimisation
    add("--beta1", type=float, default=0.8)
    add("--beta2", type=float, default=0.99)
    add("--lr_decay", type=float, default=0.999, help="ExponentialLR gamma, stepped once per epoch")
    add("--lambda_mel", type=float, default=45.0)
    add("--lambda_feature_matching", type=float, default=2.0)
    # Model and mel: a flag for every HifiGanConfig field (None = take it from the --config preset)
    add("--config", default="v1", help=f"a preset ({'|'.join(PRESETS)}; README: presets) or a config.json; "
                                       "explicit flags override it")
    add("--segment_size", type=int, default=None,
        help=f"audio samples per training crop, a multiple of the hop (default: {SEGMENT_FRAMES} frames, 8192 at hop "
             "256)")
    add_config_flags(parser, HifiGanConfig, "model and mel (default: the --config preset's)")
    # Logging
    add("--num_audio_samples", type=int, default=3,
        help="validation clips logged as audio and mel images (of different speakers where the manifest has them)")
    # Finetuning on teacher-forced mels
    add("--finetune", action="store_true")
    add("--path_to_saved_mels", default=None, help="folder of <wav stem>.npy teacher-forced mels")
    add("--path_to_pretrained_weights", default=None,
        help="a run or checkpoint folder of this repo, a generator export, or an official g_XXXXXXXX file "
             "(its do_XXXXXXXX beside it is loaded for the discriminators)")
    add("--continue_optimizer_state", action="store_true",
        help="with --finetune: also continue the pretraining run's optimisers and learning-rate schedules (Adam "
             "moments, the decayed learning rate; --learning_rate is then ignored), as the official recipe does. "
             "Needs a run/checkpoint folder of this repo, or an official g_ file with its do_ file beside it")
    args = parser.parse_args(argv)
    if args.finetune and not (args.path_to_saved_mels and args.path_to_pretrained_weights):
        parser.error("--finetune needs --path_to_saved_mels DIR and --path_to_pretrained_weights CKPT")
    if args.continue_optimizer_state and not args.finetune:
        parser.error("--continue_optimizer_state goes with --finetune (to continue a run itself, use "
                     "--resume_from_checkpoint)")
    return args


def build_config(args: argparse.Namespace) -> HifiGanConfig:
    """The --config preset (or config.json) with every explicitly given model/mel flag on top, checked; also settles
    --segment_size (default: SEGMENT_FRAMES hops of this config)."""
    config = dataclasses.replace(resolve_config(args.config), **config_overrides(args, HifiGanConfig))
    if args.segment_size is None:
        args.segment_size = SEGMENT_FRAMES * config.hop_size
    if args.segment_size <= 0 or args.segment_size % config.hop_size:
        raise UserError(f"--segment_size {args.segment_size} is not a whole number of hops ({config.hop_size} "
                        f"samples); use a multiple such as {SEGMENT_FRAMES * config.hop_size}")
    return config


# ---------------------------------------------------------------------------------------------
# Finetuning start weights
# ---------------------------------------------------------------------------------------------

# Which file of a checkpoint holds what (training.state_files): the order train.py prepares its objects in.
CHECKPOINT_FILES = state_files(["generator", "mpd", "msd"], ["generator", "discriminators"],
                               ["generator", "discriminators"])
# The models whose parameters each optimiser steps, in the order it lists them: main() builds the discriminators'
# over mpd then msd, the official train.py over msd then mpd (itertools.chain(msd.parameters(), mpd.parameters())).
# Within a model both list its parameters in its state dict's order (per conv: bias, weight_g, weight_v — this
# repo's bias, original0, original1).
OPTIMIZER_MODELS = {"generator": ("generator",), "discriminator": ("mpd", "msd")}
OFFICIAL_OPTIMIZER_MODELS = {"generator": ("generator",), "discriminator": ("msd", "mpd")}


def load_pretrained(path: str, generator: Generator, mpd: torch.nn.Module, msd: torch.nn.Module) -> str:
    """Start weights for --finetune: a run or checkpoint of this repo, a generator export (also on the Hub,
    hf://owner/name), or official g_/do_ files."""
    if hub.is_hub_id(path):
        path = hub.download(path)
    path = pretrained_checkpoint(path)  # a run folder: its newest checkpoint has the discriminators too
    if path.is_dir() and (path / COMPLETE_MARKER).exists():  # a checkpoint_<step> folder of this repo
        from safetensors.torch import load_file
        # The training state itself (weight norm's g and v as trained), each model found by its name.
        files = checkpoint_contents(path, legacy=CHECKPOINT_FILES)
        for module, name in ((generator, "generator"), (mpd, "mpd"), (msd, "msd")):
            try:
                module.load_state_dict(load_file(str(path / files[name])))
            except RuntimeError as error:
                raise UserError(f"{path / files[name]} ({name}) does not fit this model ("
                                f"{str(error).splitlines()[1].strip()}); use the same model flags as its run") from None
        return f"generator and discriminators from {path}"
    generator.load_state_dict(load_generator(path, config=generator.config).state_dict())
    discriminator_file = path.parent / path.name.replace("g_", "do_", 1) if path.name.startswith("g_") else None
    if discriminator_file is not None and discriminator_file.exists():
        load_discriminators(discriminator_file, mpd, msd)
        return f"generator from {path}, discriminators from {discriminator_file}"
    return f"generator from {path} (discriminators start fresh)"


def official_parameter_shapes(state_dicts: dict[str, dict], models: tuple[str, ...]) -> dict[str, torch.Size]:
    """{"<model>.<parameter>": shape} for the parameters of `models` (this repo's names), in the order an optimiser
    over them lists them: model after model, each in its state dict's order; spectral norm's power-iteration vectors
    are buffers, not parameters."""
    shapes = {}
    for model_name in models:
        state_dict = from_official_names({k.removeprefix("module."): v for k, v in state_dicts[model_name].items()})
        shapes.update({f"{model_name}.{key}": tensor.shape for key, tensor in state_dict.items()
                       if not key.endswith((".weight.0._u", ".weight.0._v"))})
    return shapes


def official_optimizer_state(state: dict, state_dicts: dict[str, dict], name: str, optimizer: torch.optim.Optimizer,
                             checkpoint: Path) -> dict:
    """An official optimiser state (optim_g or optim_d of a do_ file) renumbered into this run's parameter order.

    Each saved moment goes to the parameter of the same name (OFFICIAL_OPTIMIZER_MODELS -> OPTIMIZER_MODELS), and
    every one is checked shape by shape: against the official tensor of that name, and against this run's parameter.
    """
    def refuse(reason: str) -> UserError:
        return UserError(f"the {name} optimiser state in {checkpoint} belongs to another model ({reason}); use the "
                         "model flags of the pretraining run, or finetune without --continue_optimizer_state")

    official = list(official_parameter_shapes(state_dicts, OFFICIAL_OPTIMIZER_MODELS[name]).items())
    ours = official_parameter_shapes(state_dicts, OPTIMIZER_MODELS[name])
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if len(state["param_groups"]) != 1 or len(optimizer.param_groups) != 1:
        raise refuse(f"{len(state['param_groups'])} parameter groups; the official optimisers have one")
    saved_ids = state["param_groups"][0]["params"]
    if not len(saved_ids) == len(official) == len(params):
        raise refuse(f"{len(saved_ids)} parameters saved, {len(official)} in its weights, {len(params)} here")
    for (key, shape), param in zip(ours.items(), params):
        if tuple(shape) != tuple(param.shape):
            raise refuse(f"{key} is {tuple(shape)} there, {tuple(param.shape)} here")
    position = {key: i for i, key in enumerate(ours)}
    moved = {}
    for saved_id, (key, shape) in zip(saved_ids, official):
        if saved_id not in state["state"]:
            continue  # a parameter that never had a gradient
        moment = state["state"][saved_id].get("exp_avg")
        if moment is not None and tuple(moment.shape) != tuple(shape):
            raise refuse(f"its moment for {key} is {tuple(moment.shape)}, the weight {tuple(shape)}")
        moved[position[key]] = state["state"][saved_id]
    return {"state": moved, "param_groups": [{**state["param_groups"][0], "params": list(range(len(params)))}]}


def pretrained_checkpoint(path: str | os.PathLike) -> Path:
    """A run folder's newest complete checkpoint; any other path as it is."""
    path = Path(path)
    if path.is_dir() and not (path / "model.safetensors").exists() and complete_checkpoints(path):
        return complete_checkpoints(path)[-1]
    return path


def continue_optimizer_state(path: str, optimizers: tuple[torch.optim.Optimizer, torch.optim.Optimizer],
                             schedulers: tuple) -> str:
    """Load the (generator, discriminator) optimiser and scheduler states of a pretraining run into this run's.

    From a checkpoint of this repo (accelerate's optimizer*.bin / scheduler*.bin) or an official do_XXXXXXXX
    (keys optim_g, optim_d and epoch: the official code rebuilds its ExponentialLR at that epoch).
    """
    checkpoint = pretrained_checkpoint(path)
    if checkpoint.is_dir() and (checkpoint / COMPLETE_MARKER).exists():
        files = checkpoint_contents(checkpoint, legacy=CHECKPOINT_FILES)
        states = [torch.load(checkpoint / files[f"{kind}_{name}"], map_location="cpu", weights_only=True)
                  for kind in ("optimizer", "scheduler") for name in ("generator", "discriminators")]
        optimizer_states, scheduler_states = states[:2], states[2:]
    elif checkpoint.name.startswith("g_") and (do_file := checkpoint.with_name("do_" + checkpoint.name[2:])).exists():
        official = torch.load(do_file, map_location="cpu", weights_only=True)
        if not {"optim_g", "optim_d", "epoch"} <= set(official):
            raise UserError(f"{do_file} has no optimiser state (keys optim_g, optim_d, epoch); finetune without "
                            "--continue_optimizer_state")
        # The official optimisers list their parameters in another order than this run's: matched by name.
        state_dicts = {"generator": torch.load(checkpoint, map_location="cpu", weights_only=True)["generator"],
                       "mpd": official["mpd"], "msd": official["msd"]}
        optimizer_states = [official_optimizer_state(official[key], state_dicts, name, optimizer, do_file)
                            for key, name, optimizer in zip(("optim_g", "optim_d"), ("generator", "discriminator"),
                                                            optimizers)]
        scheduler_states = [{"last_epoch": official["epoch"], "_step_count": official["epoch"] + 1,
                             "base_lrs": [group["initial_lr"] for group in state["param_groups"]],
                             "_last_lr": [group["lr"] for group in state["param_groups"]]}
                            for state in optimizer_states]
    else:
        raise UserError(f"--continue_optimizer_state: {path} holds no optimiser state; pass a run or checkpoint folder "
                        "of this repo or an official g_ file with its do_ file, or finetune without the flag")
    for optimizer, state, name in zip(optimizers, optimizer_states, ("generator", "discriminator")):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        saved = [state["state"].get(index, {}).get("exp_avg") for index in range(len(params))]
        if len(state["state"]) > len(params) or any(
                moment is not None and moment.shape != param.shape for moment, param in zip(saved, params)):
            raise UserError(f"the {name} optimiser state in {checkpoint} belongs to another model; use the model "
                            "flags of the pretraining run, or finetune without --continue_optimizer_state")
        optimizer.load_state_dict(state)
    for scheduler, state in zip(schedulers, scheduler_states):
        scheduler = getattr(scheduler, "scheduler", scheduler)  # accelerate's wrapper, or a plain scheduler
        scheduler.load_state_dict({**scheduler.state_dict(), **state})
    return (f"optimisers and schedules continued from {checkpoint}: learning rate "
            f"{optimizers[0].param_groups[0]['lr']:.3g} (--learning_rate ignored)")


# ---------------------------------------------------------------------------------------------
# Logging helpers
# ---------------------------------------------------------------------------------------------

def plot_mels(mel_true: torch.Tensor, mel_generated: torch.Tensor):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(2, 1, figsize=(10, 5), sharex=True)
    for axis, mel, title in zip(axes, (mel_true, mel_generated), ("ground truth", "generated")):
        axis.imshow(mel.float().cpu().numpy(), origin="lower", aspect="auto", interpolation="none")
        axis.set_title(title)
    figure.tight_layout()
    return figure


def log_validation_media(accelerator: Accelerator, report_to: str | None, step: int, samples: list,
                         sampling_rate: int, names: list[str]) -> None:
    """Audio and mel images of a few validation clips (named by `names`: clip and speaker), ground truth beside
    generated; the ground-truth audio goes to wandb once."""
    if report_to is None or not samples:
        return
    first = report_to == "wandb" and (step == 0 or not hasattr(log_validation_media, "_logged_truth"))
    figures, sounds = {}, {}
    for i, (audio, audio_generated, mel, mel_generated) in enumerate(samples):
        sounds[f"audio_{i}"] = (audio_generated, f"generated: {names[i]}")
        if first:
            sounds[f"audio_{i}_ground_truth"] = (audio, names[i])
        figures[f"mel_{i}"] = plot_mels(mel, mel_generated)
    if report_to == "wandb":
        log_validation_media._logged_truth = True
    log_media(accelerator, report_to, step, figures, sounds, sampling_rate)


@torch.no_grad()
def validate(generator: Generator, loader: DataLoader, config: HifiGanConfig, device: torch.device,
             num_audio_samples: int, stop: Callable[[], bool] | None = None) -> tuple[float | None, list]:
    """Mel L1 on whole utterances (the paper's validation metric), plus a few clips to listen to. None instead of
    the error when `stop()` turned true on the way (a stop signal: the run saves and exits rather than finish it)."""
    generator.eval()
    total, count, samples = 0.0, 0, []
    for i, (mel, audio, loss_mel) in enumerate(loader):
        if stop is not None and stop():
            generator.train()
            return None, samples
        loss_mel = loss_mel.to(device)
        # In chunks (exact, see vocoding.vocode), so a 10-minute clip costs no more memory than a short one.
        audio_generated = vocode(generator, mel[0], max_chunk_frames=VALIDATION_CHUNK_FRAMES)[None].to(device)
        mel_generated = mel_spectrogram(audio_generated.float(), **config.mel_kwargs(for_loss=True))
        frames = min(mel_generated.shape[-1], loss_mel.shape[-1])
        total += torch.nn.functional.l1_loss(mel_generated[..., :frames], loss_mel[..., :frames]).item()
        count += 1
        if i < num_audio_samples:
            samples.append((audio[0].cpu(), audio_generated[0].float().cpu(), loss_mel[0].cpu(),
                            mel_generated[0].cpu()))
    generator.train()
    return total / max(count, 1), samples


def main(argv: list[str] | None = None) -> Generator:
    """Train; returns this process's (unwrapped) generator."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    config = build_config(args)
    run_dir = Path(args.working_directory) / args.experiment_name
    report_to = setup_trackers(args.report_to, args.log_wandb)

    # non_blocking: batches go to the GPU from pinned memory without making the host wait for the copy.
    # DDP's gradients are views into its all-reduce buckets: none copied back after its all-reduce, nor held twice.
    accelerator = make_accelerator(args, run_dir, report_to, non_blocking=True, mixed_precision=args.mixed_precision,
                                   dynamo_backend="inductor" if args.compile else None,
                                   kwargs_handlers=[DistributedDataParallelKwargs(gradient_as_bucket_view=True)])
    # TF32 tensor cores for fp32 convs/matmuls on Ampere+ (10-bit mantissa inputs, fp32 accumulation):
    # a large speed-up that GAN vocoder training tolerates; --no_tf32 turns it off.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not args.no_tf32
    cuda = accelerator.device.type == "cuda"
    # One CUDA graph per step removes the host from the loop (model.train_step never waits for the GPU). It needs
    # one process (DDP's all-reduces are not captured here) and no fp16 GradScaler (whose update reads the host).
    use_graphs = args.cuda_graphs and cuda and accelerator.num_processes == 1 and \
        accelerator.mixed_precision != "fp16" and not args.compile
    precision = accelerator.mixed_precision + (" (discriminators)" if args.mixed_precision_networks == "discriminators"
                                               and accelerator.mixed_precision != "no" else "")
    accelerator.print(f"HiFi-GAN on {accelerator.num_processes} process(es), device {accelerator.device}, "
                      f"mixed precision {precision}, CUDA graphs {'on' if use_graphs else 'off'}")

    # Data
    saved_mels = args.path_to_saved_mels if args.finetune else None
    # Clips at another sample rate are resampled once, shared by every run in the working directory; the main
    # process writes the copies while the others wait, then find them.
    data = {"config": config, "segment_size": args.segment_size, "saved_mels_dir": saved_mels, "seed": args.seed,
            "skip_bad_files": args.skip_bad_files, "report_dir": run_dir,
            "resample_cache": Path(args.working_directory) / "resampled" / str(config.sampling_rate)}
    with accelerator.main_process_first():
        train_set = MelDataset(args.path_to_train_manifest, train=True, **data)
        val_set = MelDataset(args.path_to_val_manifest, train=False, **data)
    if len(train_set) < args.batch_size * accelerator.num_processes:
        raise UserError(f"{args.path_to_train_manifest} has {len(train_set)} clips, fewer than one batch of "
                        f"{args.batch_size} x {accelerator.num_processes} processes; lower --batch_size")
    # Speakers in turn, so that the clips logged (and --num_val_clips) cover several speakers; batches mix
    # speakers anyway (shuffled).
    val_set.select(interleave_speakers(val_set.rows)[:args.num_val_clips])
    # Workers that stay alive across epochs and keep batches queued, so the GPU never waits on audio decoding
    # (the wait per step is logged as train/data_wait_seconds_per_step).
    workers = {"persistent_workers": True, "prefetch_factor": 4} if args.num_workers > 0 else {}
    # The workers leave stop signals, which reach every process of the job, to the main process: it saves and stops.
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True,
                              num_workers=args.num_workers, pin_memory=accelerator.device.type == "cuda",
                              **workers, **signal_safe_workers(args.num_workers))
    val_loader = DataLoader(val_set, batch_size=1, shuffle=False, num_workers=min(args.num_workers, 1),
                            **signal_safe_workers(min(args.num_workers, 1)))

    # Models, optimisers, schedulers
    generator = Generator(config)
    mpd = MultiPeriodDiscriminator(config.mpd_periods, config.discriminator_width_divisor)
    msd = MultiScaleDiscriminator(config.discriminator_width_divisor)
    if args.finetune:
        accelerator.print(f"finetuning: {load_pretrained(args.path_to_pretrained_weights, generator, mpd, msd)}")
    # Half precision on a GPU runs channels-last: cuDNN's half kernels want NHWC, and NCW activations would be
    # transposed in and out of every convolution (model.conv).
    half = [generator, mpd, msd]
    if args.mixed_precision_networks == "discriminators":
        full_precision(generator)
        half.remove(generator)
    channels_last(*half, enabled=cuda and accelerator.mixed_precision in ("bf16", "fp16"))
    # Fused AdamW: one kernel for all parameters, and it skips a non-finite step on the device (model.step_if_finite)
    # rather than making the host wait for the flag every step. A captured step keeps its counters on the device.
    adamw = {"betas": (args.beta1, args.beta2), "fused": True, "capturable": use_graphs}
    optim_g = torch.optim.AdamW(generator.parameters(), args.learning_rate, **adamw)
    optim_d = torch.optim.AdamW(itertools.chain(mpd.parameters(), msd.parameters()), args.learning_rate, **adamw)
    scheduler_g = torch.optim.lr_scheduler.ExponentialLR(optim_g, gamma=args.lr_decay)
    scheduler_d = torch.optim.lr_scheduler.ExponentialLR(optim_d, gamma=args.lr_decay)
    # Every module goes through prepare and the loop calls the *prepared* ones: that is what makes
    # DDP average gradients across processes. (The order names the checkpoint's files: CHECKPOINT_FILES.)
    generator, mpd, msd, optim_g, optim_d, scheduler_g, scheduler_d, train_loader = accelerator.prepare(
        generator, mpd, msd, optim_g, optim_d, scheduler_g, scheduler_d, train_loader)
    if args.continue_optimizer_state:
        accelerator.print(continue_optimizer_state(args.path_to_pretrained_weights, (optim_g, optim_d),
                                                   (scheduler_g, scheduler_d)))
    state = resume(accelerator, args.resume_from_checkpoint, run_dir, config.to_dict())
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
        # How to reproduce it: the command, every flag (defaults included), the versions
        record_run(run_dir, __file__, argv, vars(args), accelerator.num_processes, state.step)
    report_to = start_trackers(accelerator, report_to, args.experiment_name, run_dir,
                               {**vars(args), **config.to_dict()})

    steps_per_epoch = len(train_loader)
    max_steps = args.max_steps if args.max_steps is not None else args.training_epochs * steps_per_epoch
    mel_kwargs_loss = config.mel_kwargs(for_loss=True)
    progress = tqdm(total=max_steps, initial=state.step, disable=not accelerator.is_main_process,
                    desc="train", dynamic_ncols=True)
    step_log = StepLog(accelerator, progress, state.step, args.wandb_log_iters, args.console_out_iters)

    def validate_now() -> None:
        if accelerator.is_main_process:
            val_error, samples = validate(accelerator.unwrap_model(generator), val_loader, config,
                                          accelerator.device, args.num_audio_samples, stop=run.stopping)
            if val_error is None:
                accelerator.print(f"step {state.step}: validation cut short by {run.stop_signal.received}")
            else:
                accelerator.print(f"step {state.step}: validation mel L1 {val_error:.4f}")
                accelerator.log({"val/mel_error": val_error}, step=state.step)
                names = [Path(row.audio_path).stem + (f" ({row.speaker})" if row.speaker else "")
                         for row in val_set.rows[:len(samples)]]
                log_validation_media(accelerator, report_to, state.step, samples, config.sampling_rate, names)
        accelerator.wait_for_everyone()

    def export(folder: Path) -> None:  # the inference generator inside each checkpoint, for inference.py, --finetune
        save_generator(accelerator.unwrap_model(generator), folder)

    def console_line(scalars: dict[str, float]) -> str:
        return (f"step {state.step} epoch {state.epoch}: gen {scalars['train/loss_generator']:.3f} "
                f"disc {scalars['train/loss_discriminator']:.3f} mel {scalars['train/loss_mel']:.4f} "
                f"lr {scalars['train/learning_rate']:.2e} {scalars['train/steps_per_second']:.2f} steps/s "
                f"(data wait {1e3 * scalars['train/data_wait_seconds_per_step']:.0f} ms/step)")

    def step(mel: torch.Tensor, audio: torch.Tensor, loss_mel: torch.Tensor) -> dict:
        return train_step(accelerator, generator, mpd, msd, optim_g, optim_d, mel, audio, loss_mel, mel_kwargs_loss,
                          args.lambda_mel, args.lambda_feature_matching)
    if use_graphs:
        step = CudaGraphStep(step)

    run = RunControl(accelerator, run_dir, state, export, max_steps=max_steps, keep_last=args.keep_last_checkpoints,
                     checkpoint_steps=args.checkpoint_steps, checkpoint_epochs=args.checkpoint_epochs,
                     validation_steps=args.validation_steps, validate=validate_now, contents=CHECKPOINT_FILES)
    while run.going():
        epoch = state.epoch
        train_set.set_epoch(epoch)
        for mel, audio, loss_mel in epoch_batches(accelerator, train_loader, state, step_log, steps_per_epoch,
                                                  args.batch_size * accelerator.num_processes):
            losses = step(mel, audio, loss_mel)
            state.step += 1
            step_log.count(state.step, {name: losses[f"{name}_stepped"] for name in ("discriminator", "generator")})
            if step_log.due(state.step):
                scalars = {f"train/{k}": v.item() for k, v in losses.items() if isinstance(v, torch.Tensor)}
                scalars.update({"train/learning_rate": scheduler_g.get_last_lr()[0], "train/epoch": epoch})
                step_log.log(state.step, scalars, console_line, {
                    "mel": f"{scalars['train/loss_mel']:.3f}", "gen": f"{scalars['train/loss_generator']:.2f}",
                    "disc": f"{scalars['train/loss_discriminator']:.2f}"})
            # The skipped steps left the weights untouched: what gets saved is the last good state.
            if run.after_step(step_log.too_many_nonfinite(args.max_nonfinite_steps)):
                break
        else:
            # The epoch ran to its end: decay the learning rate once, as the official recipe does.
            state.epoch, state.epoch_start_step = state.epoch + 1, state.step
            scheduler_g.step()
            scheduler_d.step()
            if use_graphs:  # the captured optimiser steps hold the old learning rate
                step.invalidate()
            run.after_epoch()

    progress.close()
    run.finish(advice="Try a lower --learning_rate, fp32 (no --mixed_precision), or check the data")
    return accelerator.unwrap_model(generator)


if __name__ == "__main__":
    run_cli(main)
