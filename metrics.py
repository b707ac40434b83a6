"""Objective quality metrics of synthesised speech, for evaluate.py and notebooks.

Reference-based metrics compare a degraded (vocoded) signal with the recording it came from:
log-mel L1, mel cepstral distortion, PESQ-WB, STOI, F0 RMSE and voicing error. MOS predictors score
one signal alone: DNSMOS (offline, the `speechmos` package's ONNX models) and UTMOS22 strong (utmos.py, this repo's
port, from a weights file on disk).

Every function takes numpy arrays or tensors, crops the pair to the shorter length (a vocoder returns
frames * hop samples, a few fewer than the recording), and never returns NaN: where a metric is
undefined (a silent reference, nothing voiced, a missing package) it returns None, which the tables
show as "n/a".
"""

from __future__ import annotations

import functools
import math
import warnings
from pathlib import Path

import numpy as np
import torch

import utmos as utmos22
from model import HifiGanConfig
from utils import UserError, mel_spectrogram

# Peak below -80 dBFS (a few 16-bit LSBs): no signal to compare against.
SILENCE_PEAK = 1e-4
# PESQ, pyin and DNSMOS all work at 16 kHz (PESQ-WB and DNSMOS are defined there).
METRIC_RATE = 16000
# pyin's search range: covers low male voices to high children's voices.
F0_MIN, F0_MAX = 50.0, 600.0


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def _as_numpy(audio: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(audio, torch.Tensor):
        audio = audio.detach().float().cpu().numpy()
    audio = np.nan_to_num(np.asarray(audio, dtype=np.float32).reshape(-1))
    if audio.size == 0:
        raise ValueError("empty audio")
    return audio


def _pair(reference, degraded) -> tuple[np.ndarray, np.ndarray]:
    reference, degraded = _as_numpy(reference), _as_numpy(degraded)
    length = min(len(reference), len(degraded))
    return reference[:length], degraded[:length]


def _is_silent(audio: np.ndarray) -> bool:
    return float(np.abs(audio).max()) < SILENCE_PEAK


def _resample(audio: np.ndarray, sampling_rate: int, target_rate: int = METRIC_RATE) -> np.ndarray:
    if sampling_rate == target_rate:
        return audio
    from scipy.signal import resample_poly
    # Polyphase resampling is exact for rational ratios (22050 -> 16000 is 320/441) and fast.
    gcd = math.gcd(int(sampling_rate), int(target_rate))
    return resample_poly(audio, target_rate // gcd, int(sampling_rate) // gcd).astype(np.float32)


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)


# ---------------------------------------------------------------------------------------------
# Spectral distances
# ---------------------------------------------------------------------------------------------

def log_mel_l1(reference: np.ndarray | torch.Tensor, degraded: np.ndarray | torch.Tensor,
               config: HifiGanConfig) -> float:
    """Mean |log-mel(reference) - log-mel(degraded)| with the training loss's mel (fmax_loss), as in the paper.

    Both mels floor at log(1e-5), so silence on either side gives a finite value.
    """
    reference, degraded = _pair(reference, degraded)
    mels = mel_spectrogram(torch.from_numpy(np.stack([reference, degraded])), **config.mel_kwargs(for_loss=True))
    return float(torch.mean(torch.abs(mels[0] - mels[1])))


# Mel-cepstrum order and all-pass constant per sampling rate, as ESPnet's MCD uses them (the constant is the one whose
# frequency warping best follows the mel scale at that rate); other rates take the nearest.
MCEP_PARAMETERS = {16000: (23, 0.42), 22050: (34, 0.45), 24000: (34, 0.46), 44100: (39, 0.53), 48000: (39, 0.55)}
MCEP_POWER_FLOOR = 1e-10  # -100 dB: a digitally silent frame gets a flat spectrum, not log(0)


def frequency_warp(cepstrum: np.ndarray, order: int, alpha: float) -> np.ndarray:
    """Cepstrum [..., M1 + 1] -> mel-cepstrum [..., order + 1] with all-pass constant `alpha` (SPTK's freqt).

    Both follow SPTK's one-sided convention, ln|H(e^jw)| = sum_m c(m) cos(m w); the mel-cepstrum's cosines run on the
    warped frequency b(w) = w + 2 atan(alpha sin w / (1 - alpha cos w)) instead of w. The recursion is the all-pass
    filter bank of Oppenheim and Johnson (1972), run from the highest input coefficient down.
    """
    beta = 1.0 - alpha * alpha
    warped = np.zeros((*cepstrum.shape[:-1], order + 1))
    for i in range(cepstrum.shape[-1] - 1, -1, -1):
        previous = warped.copy()
        warped[..., 0] = cepstrum[..., i] + alpha * previous[..., 0]
        if order >= 1:
            warped[..., 1] = beta * previous[..., 0] + alpha * previous[..., 1]
        for j in range(2, order + 1):
            warped[..., j] = previous[..., j - 1] + alpha * (previous[..., j] - warped[..., j - 1])
    return warped


def mel_cepstrum(power_spectrum: np.ndarray, order: int, alpha: float) -> np.ndarray:
    """Power spectra [..., n_fft / 2 + 1] -> mel-cepstra [..., order + 1] (SPTK's convention, as pysptk's sp2mc):
    the real cepstrum of the log amplitude, made one-sided, then frequency-warped."""
    cepstrum = np.fft.irfft(np.log(np.maximum(power_spectrum, MCEP_POWER_FLOOR)), axis=-1)
    # irfft of ln|X|^2 is twice the two-sided cepstrum of ln|X|: one-sided, that is c(m) for 0 < m < n/2, and twice
    # c(0) and c(n/2), which appear once.
    half = cepstrum[..., :cepstrum.shape[-1] // 2 + 1].copy()
    half[..., 0] /= 2.0
    half[..., -1] /= 2.0
    return frequency_warp(half, order, alpha)


def _mel_cepstra(audio: np.ndarray, sampling_rate: int) -> np.ndarray:
    """Mel-cepstra c_1..c_M (c_0, the loudness, left out) of Hann-windowed ~46 ms frames, hop a quarter:
    [frames, M]."""
    rate = min(MCEP_PARAMETERS, key=lambda known: abs(known - sampling_rate))
    order, alpha = MCEP_PARAMETERS[rate]
    n_fft = 2 ** round(math.log2(0.046 * sampling_rate))
    spectrum = torch.stft(torch.from_numpy(audio).double(), n_fft, n_fft // 4, window=torch.hann_window(n_fft,
                          dtype=torch.float64), center=True, pad_mode="reflect", return_complex=True)
    power = (spectrum.abs() ** 2).numpy().T  # [frames, n_fft / 2 + 1]
    return mel_cepstrum(power, order, alpha)[:, 1:]


def mel_cepstral_distortion(reference: np.ndarray | torch.Tensor, degraded: np.ndarray | torch.Tensor,
                            sampling_rate: int, use_dtw: bool = False) -> float:
    """Mel-cepstral distortion in dB as papers report it (Kubichek 1993; ESPnet's and SPTK's mel-cepstrum).

    Per frame MCD = 10/ln(10) * sqrt(2 * sum_{m=1..M} (c_m - c'_m)^2), averaged over frames, on the mel-cepstra of
    `mel_cepstrum` (order M and all-pass constant by rate, MCEP_PARAMETERS: 34 and 0.45 at 22.05 kHz), c_0 excluded.
    Frames are paired one to one, since a vocoder's output is sample-aligned with its reference; `use_dtw=True`
    aligns them by dynamic time warping first (for outputs that are not aligned, e.g. free-running TTS).
    """
    reference, degraded = _as_numpy(reference), _as_numpy(degraded)
    if not use_dtw:
        reference, degraded = _pair(reference, degraded)
    ref_cep, deg_cep = _mel_cepstra(reference, sampling_rate), _mel_cepstra(degraded, sampling_rate)
    if use_dtw:
        import librosa
        _, path = librosa.sequence.dtw(X=ref_cep.T, Y=deg_cep.T, metric="euclidean")
        ref_cep, deg_cep = ref_cep[path[::-1, 0]], deg_cep[path[::-1, 1]]
    per_frame = 10.0 / math.log(10.0) * np.sqrt(2.0 * np.sum((ref_cep - deg_cep) ** 2, axis=1))
    return float(per_frame.mean())


# ---------------------------------------------------------------------------------------------
# Perceptual / intelligibility
# ---------------------------------------------------------------------------------------------

def pesq_wb(reference: np.ndarray | torch.Tensor, degraded: np.ndarray | torch.Tensor,
            sampling_rate: int) -> float | None:
    """Wide-band PESQ (ITU-T P.862.2, MOS-LQO 1.04 to 4.64) at 16 kHz, via the `pesq` package.

    None when the reference is silent (PESQ finds no utterance to compare) or shorter than PESQ's minimum
    of 0.25 s. A silent or near-silent degraded signal makes PESQ itself fail; it gets 1.0, the bottom of
    the scale, since that output really is as bad as it gets.
    """
    try:
        from pesq import PesqError, pesq
    except ImportError:
        raise UserError("PESQ needs the `pesq` package: pip install pesq") from None
    reference, degraded = _pair(reference, degraded)
    if _is_silent(reference):
        return None
    if _is_silent(degraded):
        return 1.0
    reference, degraded = _resample(reference, sampling_rate), _resample(degraded, sampling_rate)
    try:
        return float(pesq(METRIC_RATE, reference, degraded, "wb"))
    except PesqError:  # no utterance detected, or shorter than 0.25 s
        return None
    except ValueError:
        # pesq's C code returns NaN (then fails converting it) when the degraded level is ~zero.
        return 1.0


def stoi(reference: np.ndarray | torch.Tensor, degraded: np.ndarray | torch.Tensor,
         sampling_rate: int) -> float | None:
    """Short-time objective intelligibility (Taal et al. 2011; 0 to 1) via pystoi.

    None for a silent reference, or one with under ~0.4 s of speech (STOI needs 30 frames of it; pystoi
    would warn and return a meaningless 1e-5).
    """
    try:
        from pystoi import stoi as pystoi_stoi
    except ImportError:
        raise UserError("STOI needs the `pystoi` package: pip install pystoi") from None
    reference, degraded = _pair(reference, degraded)
    if _is_silent(reference):
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        score = pystoi_stoi(reference.astype(np.float64), degraded.astype(np.float64), sampling_rate)
    if any("Not enough STFT frames" in str(warning.message) for warning in caught):
        return None
    return float(score)


# ---------------------------------------------------------------------------------------------
# Pitch
# ---------------------------------------------------------------------------------------------

def f0_track(audio: np.ndarray | torch.Tensor, sampling_rate: int) -> tuple[np.ndarray, np.ndarray]:
    """(f0 in Hz with NaN where unvoiced, voiced flags) every 10 ms, by librosa.pyin at 16 kHz, 50-600 Hz."""
    import librosa
    audio = _resample(_as_numpy(audio), sampling_rate)
    if _is_silent(audio):
        frames = 1 + len(audio) // 160
        return np.full(frames, np.nan), np.zeros(frames, dtype=bool)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pyin warns on frames it cannot analyse; those come out unvoiced
        # 64 ms frames hold two periods of 50 Hz; pyin costs ~0.1 s per second of audio here.
        f0, voiced, _ = librosa.pyin(audio, fmin=F0_MIN, fmax=F0_MAX, sr=METRIC_RATE, frame_length=1024,
                                     hop_length=160)
    return f0, voiced.astype(bool)


def f0_rmse_and_vuv(reference: np.ndarray | torch.Tensor, degraded: np.ndarray | torch.Tensor,
                    sampling_rate: int, reference_track: tuple[np.ndarray, np.ndarray] | None = None
                    ) -> tuple[float | None, float]:
    """(F0 RMSE in cents over frames voiced in both, voiced/unvoiced decision error rate over all frames).

    Cents (1200 * log2 of the ratio) so that an octave error weighs the same for low and high voices.
    The RMSE is None when no frame is voiced in both signals; the V/UV error is always defined.
    `reference_track`: f0_track(reference) computed once for a clip that several systems are compared with (pyin is
    the slowest metric); frames are then compared over the shorter of the two tracks.
    """
    if reference_track is None:
        reference, degraded = _pair(reference, degraded)
        reference_track = f0_track(reference, sampling_rate)
    ref_f0, ref_voiced = reference_track
    deg_f0, deg_voiced = f0_track(degraded, sampling_rate)
    frames = min(len(ref_f0), len(deg_f0))
    ref_f0, ref_voiced, deg_f0, deg_voiced = ref_f0[:frames], ref_voiced[:frames], deg_f0[:frames], deg_voiced[:frames]
    vuv_error = float(np.mean(ref_voiced != deg_voiced))
    both = ref_voiced & deg_voiced & np.isfinite(ref_f0) & np.isfinite(deg_f0)
    if not both.any():
        return None, vuv_error
    cents = 1200.0 * np.log2(deg_f0[both] / ref_f0[both])
    return float(np.sqrt(np.mean(cents ** 2))), vuv_error


# ---------------------------------------------------------------------------------------------
# MOS predictors
# ---------------------------------------------------------------------------------------------

def dnsmos(audio: np.ndarray | torch.Tensor, sampling_rate: int) -> dict[str, float] | None:
    """DNSMOS (Reddy et al.): {"p808": P.808 MOS, "sig", "bak", "ovrl": P.835 MOS}, each about 1 to 5.

    Runs Microsoft's ONNX models shipped in the `speechmos` package (onnxruntime, 16 kHz, no network).
    None, with a one-time warning, when `speechmos` or `onnxruntime` is not installed. Clips shorter than
    DNSMOS's 9 s window are repeated to fill it, as the reference implementation does.
    """
    try:
        from speechmos import dnsmos as speechmos_dnsmos
    except ImportError as error:
        _warn_once(f"DNSMOS skipped: {error}. Install it with: pip install speechmos onnxruntime")
        return None
    audio = np.clip(_resample(_as_numpy(audio), sampling_rate), -1.0, 1.0)
    # speechmos repeats a short clip by doubling until it covers the window, then scores every 1 s hop
    # of the result (a 2 s clip becomes 16 s and six windows of the same content); one window of the
    # tiled clip gives the same score for a sixth of the time.
    window = math.ceil(speechmos_dnsmos.INPUT_LENGTH * METRIC_RATE)
    if len(audio) < window:
        audio = np.resize(audio, window)
    scores = speechmos_dnsmos.run(audio, sr=METRIC_RATE)
    return {key: float(scores[f"{key}_mos"]) for key in ("p808", "sig", "bak", "ovrl")}


def find_utmos(checkpoint: str | None = None) -> Path | None:
    """The UTMOS22-strong weights file to use, or None when none is on disk (they cannot be fetched offline).

    `checkpoint`: the weights file, or a folder holding `utmos22_strong_step7459_v1.pt`. Without it, the file where
    a first online `torch.hub.load("tarepan/SpeechMOS:v1.2.0", "utmos22_strong", trust_repo=True)` leaves it:
    `torch.hub.get_dir()/checkpoints/`. utmos.py says where to download it.
    """
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if path.is_dir():
            path = path / utmos22.UTMOS_WEIGHTS
        if not path.is_file():
            raise UserError(f"UTMOS weights {path} do not exist; download {utmos22.UTMOS_URL} and pass the file as "
                            "--utmos_checkpoint")
        return path
    cached = Path(torch.hub.get_dir()) / "checkpoints" / utmos22.UTMOS_WEIGHTS
    return cached if cached.is_file() else None


@functools.lru_cache(maxsize=2)
def _load_utmos(weights: Path) -> torch.nn.Module:
    return utmos22.load_utmos(weights)


def utmos(audio: np.ndarray | torch.Tensor, sampling_rate: int, checkpoint: str | None = None) -> float | None:
    """UTMOS22-strong naturalness MOS (Saeki et al. 2022; utmos.py, this repo's port), about 1 to 5.

    None when no weights are on disk (see find_utmos) or the clip is shorter than the model's first frame.
    """
    weights = find_utmos(checkpoint)
    if weights is None:
        return None
    # The reference's own resampler (it resamples inside the model), not _resample's Kaiser filter.
    wave = utmos22.resample(torch.from_numpy(_as_numpy(audio))[None], sampling_rate, utmos22.SAMPLE_RATE)
    if wave.shape[-1] < utmos22.MIN_SAMPLES:
        return None
    return float(utmos22.score(_load_utmos(weights), wave)[0])
