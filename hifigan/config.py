"""`HifiGanConfig`: every hyper-parameter of a HiFi-GAN vocoder and its mel, the presets, and resolving a config
from a preset name, a dict or a config.json (docs/design.md §3, §5)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from utils import MelConfig, UserError

# The mel a HiFi-GAN vocoder consumes is a utils.MelConfig, whose settings are declared there, once. Each is a
# HifiGanConfig field too (flat in config.json, a flag of train.py) but for the frames and the level, which a vocoder
# keeps at MelConfig's defaults: uncentred frames and the official pretraining's 0.95 peak (docs/design.md §1).
VOCODER_FIXED_MEL = ("center", "audio_peak")
MEL_SETTINGS = tuple(setting.name for setting in dataclasses.fields(MelConfig) if setting.name not in VOCODER_FIXED_MEL)


def _with_mel_settings(cls: type) -> type:
    """`@dataclass` for HifiGanConfig, with MEL_SETTINGS declared as fields of its own: after the model's, in
    MelConfig's order and with MelConfig's defaults, flag types and help, and `fmax_loss` beside `fmax` (the order
    config.json and train.py's flags have always had)."""
    annotations = dict(inspect.get_annotations(cls))  # the class body's own, in its order
    fmax_loss = annotations.pop("fmax_loss")
    for setting in dataclasses.fields(MelConfig):
        if setting.name in MEL_SETTINGS:
            annotations[setting.name] = setting.type
            setattr(cls, setting.name, field(default=setting.default, metadata=setting.metadata))
        if setting.name == "fmax":
            annotations["fmax_loss"] = fmax_loss
    cls.__annotations__ = annotations
    return dataclass(cls)


@_with_mel_settings
class HifiGanConfig:
    """Every hyper-parameter needed to rebuild the generator and its mel; serialised (flat) as config.json.

    Its fields: the model's below, then MEL_SETTINGS (`sampling_rate`, `num_mels`, ..., `fmax`, `mel_scale`, ...:
    utils.MelConfig's, declared there) and `fmax_loss`. Checked on construction (`check`), so a config from flags,
    a preset or a config.json cannot build a model that cannot work; train.py's model and mel flags are generated
    from these fields (utils.add_config_flags).
    """
    resblock: str = field(default="1", metadata={"choices": ["1", "2"], "help": "1: V1/V2 MRF blocks; 2: V3's"})
    upsample_rates: tuple[int, ...] = (8, 8, 2, 2)
    upsample_kernel_sizes: tuple[int, ...] = (16, 16, 4, 4)
    upsample_initial_channel: int = 512
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = field(
        default=((1, 3, 5), (1, 3, 5), (1, 3, 5)), metadata={"help": "'((1,3,5),(1,3,5),(1,3,5))'"})
    mpd_periods: tuple[int, ...] = (2, 3, 5, 7, 11)
    # 1 = the official discriminators. A larger divisor thins every discriminator layer; it exists
    # for quick experiments and the test suite, where the 70 M official parameters dominate a step.
    discriminator_width_divisor: int = field(default=1, metadata={
        "help": "thin every discriminator layer by this factor (1 = official; tests use 8)"})
    # Here _with_mel_settings declares MEL_SETTINGS, the mel the generator consumes, with fmax_loss after fmax.
    fmax_loss: float | None = field(default=None, metadata={"help": "mel-loss fmax (default: sampling_rate / 2)"})

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """A UserError naming the fix for a combination that cannot work."""
        if math.prod(self.upsample_rates) != self.hop_size:
            raise UserError(f"the upsample rates {tuple(self.upsample_rates)} multiply to "
                            f"{math.prod(self.upsample_rates)}, but the generator must upsample each mel frame by "
                            f"--hop_size {self.hop_size}; make their product the hop size")
        if len(self.upsample_rates) != len(self.upsample_kernel_sizes):
            raise UserError("--upsample_rates and --upsample_kernel_sizes need the same number of values")
        for rate, kernel in zip(self.upsample_rates, self.upsample_kernel_sizes):
            # A transposed conv with padding (kernel - rate) / 2 makes exactly rate samples per input sample only
            # when kernel - rate is even and not negative; otherwise the audio drifts off frames x hop.
            if kernel < rate or (kernel - rate) % 2:
                raise UserError(f"upsample kernel {kernel} does not fit rate {rate}: a kernel must be at least its "
                                f"rate and differ from it by an even number (2 x rate is usual: {2 * rate})")
        if len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes):
            raise UserError("--resblock_kernel_sizes and --resblock_dilation_sizes need the same number of entries")
        if self.discriminator_width_divisor not in (1, 2, 4, 8):
            # The scale discriminators' grouped convs need 16 | 128 / divisor channels.
            raise UserError(f"--discriminator_width_divisor {self.discriminator_width_divisor}: choose 1, 2, 4 or 8")
        if self.resblock not in ("1", "2"):
            raise UserError(f"--resblock {self.resblock!r}: choose 1 or 2")
        if self.fmax_loss is not None and self.fmax_loss > self.sampling_rate / 2:
            raise UserError(f"--fmax_loss {self.fmax_loss} is above the Nyquist frequency "
                            f"({self.sampling_rate / 2:g} Hz); lower it or leave it out")
        self.mel.checked()

    @property
    def mel(self) -> MelConfig:
        """The generator's input mel: the vocoder's frames, and the official pretraining level (0.95 peak)."""
        return MelConfig(**{name: getattr(self, name) for name in MEL_SETTINGS})

    def mel_kwargs(self, for_loss: bool = False) -> dict:
        """Keyword arguments of utils.mel_spectrogram for the input mel (or the loss mel, up to fmax_loss)."""
        return {**self.mel.kwargs(), "fmax": self.fmax_loss} if for_loss else self.mel.kwargs()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> HifiGanConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in values.items() if k in known}
        # JSON turns tuples into lists; keep tuples so configs compare equal after a round trip.
        for key, value in values.items():
            if isinstance(value, list):
                values[key] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        return cls(**values)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> HifiGanConfig:
        if name not in PRESETS:
            raise UserError(f"unknown config {name!r}; choose one of {', '.join(PRESETS)} or give a config.json path")
        return dataclasses.replace(PRESETS[name], **overrides)


# v1/v2/v3: the official 22.05 kHz configs (config_v1/v2/v3.json of jik876/hifi-gan). The other rates keep V1's
# generator (change its width with --upsample_initial_channel, e.g. 128 for a V2-sized model) and take their mel
# from published vocoders at that rate; the hop stays the product of the upsampling rates, the window and FFT
# cover about 46 ms, and the mel reaches the band the rate carries.
PRESETS: dict[str, HifiGanConfig] = {
    "v1": HifiGanConfig(),
    "v2": HifiGanConfig(upsample_initial_channel=128),
    "v3": HifiGanConfig(resblock="2", upsample_rates=(8, 8, 4), upsample_kernel_sizes=(16, 16, 8),
                        upsample_initial_channel=256, resblock_kernel_sizes=(3, 5, 7),
                        resblock_dilation_sizes=((1, 2), (2, 6), (3, 12))),
    # SpeechBrain's LibriTTS 16 kHz HiFi-GAN: the 22.05 kHz STFT settings at 16 kHz, mel up to Nyquist.
    "16khz": HifiGanConfig(sampling_rate=16000, fmax=8000.0),
    # BigVGAN's 24 kHz 100-band 256x setting (bigvgan_24khz_100band): mel up to Nyquist.
    "24khz": HifiGanConfig(sampling_rate=24000, num_mels=100, fmax=12000.0),
    # BigVGAN-v2's 44 kHz 128-band 512x setting (bigvgan_v2_44khz_128band_512x): a 2048-sample STFT, hop 512,
    # mel up to Nyquist; the 512x upsampling as 8 x 8 x 4 x 2, the four-stage layout of NeMo's 44.1 kHz HiFi-GAN.
    "44khz": HifiGanConfig(sampling_rate=44100, num_mels=128, n_fft=2048, window_size=2048, hop_size=512,
                           fmax=None, upsample_rates=(8, 8, 4, 2), upsample_kernel_sizes=(16, 16, 8, 4)),
    # The 44 kHz setting at 48 kHz (hop 512 = 10.7 ms).
    "48khz": HifiGanConfig(sampling_rate=48000, num_mels=128, n_fft=2048, window_size=2048, hop_size=512,
                           fmax=None, upsample_rates=(8, 8, 4, 2), upsample_kernel_sizes=(16, 16, 8, 4)),
}
# A training crop of 32 frames: 8192 samples at hop 256 (the official segment), 16384 at hop 512.
SEGMENT_FRAMES = 32


def resolve_config(config: HifiGanConfig | dict | str | os.PathLike | None) -> HifiGanConfig:
    """A config from a dataclass, a dict, a preset name ("v1") or a config.json path."""
    if config is None:
        return HifiGanConfig()
    if isinstance(config, HifiGanConfig):
        return config
    if isinstance(config, dict):
        return HifiGanConfig.from_dict(config)
    if str(config).lower() in PRESETS:
        return PRESETS[str(config).lower()]
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise UserError(f"config {config} is neither a preset ({', '.join(PRESETS)}) nor a config.json file")
    return HifiGanConfig.from_dict(json.loads(path.read_text()))

