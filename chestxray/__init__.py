"""chestxray: multi-label chest X-ray classification with explanations.

The small public API::

    from chestxray import Predictor, read_image
    pred = Predictor.load("resnet18")            # shipped name, folder, or hf-hub:org/name
    probs = pred.predict("film.dcm")             # {label: probability}
    analysis = pred.analyze(read_image("film.png"))   # probabilities + Grad-CAM of every label
    rgb = analysis.overlay("Effusion", alpha=0.4)
"""
from chestxray.imaging import ImageReadError, XrayImage, read_image
from chestxray.labels import LABEL_SETS, get_label_set
from chestxray.predictor import Analysis, Predictor

__all__ = ["Analysis", "ImageReadError", "LABEL_SETS", "Predictor", "XrayImage", "get_label_set", "read_image"]
__version__ = "0.1.0"
