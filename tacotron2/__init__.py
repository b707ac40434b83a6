"""Tacotron2 (text -> mel) with NVIDIA's parameter layout and text front end.

    from tacotron2 import load_tacotron2, text_to_sequence
    model = load_tacotron2("tacotron2_statedict.pt")          # NVIDIA's file, or a save_tacotron2 folder (eval mode)
    mel, mel_postnet, gate, alignments = model.infer("Hello world.")      # text: NVIDIA's english_cleaners
    mel, mel_postnet, gate, alignments = model.infer(text_to_sequence("Hello world."))  # or symbol ids
"""

from tacotron2.checkpoint import config_from_state_dict, load_tacotron2, save_tacotron2
from tacotron2.model import Tacotron2, Tacotron2Config
from tacotron2.text import sequence_to_text, symbols, text_to_sequence

__all__ = [
    "Tacotron2",
    "Tacotron2Config",
    "config_from_state_dict",
    "load_tacotron2",
    "save_tacotron2",
    "sequence_to_text",
    "symbols",
    "text_to_sequence",
]
