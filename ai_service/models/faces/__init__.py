"""Face detection + recognition for Immich's ``facial-recognition`` task.

``FaceFamily`` serves InsightFace packs (SCRFD + ArcFace, as Immich runs them) and the built-in
``dlib`` model; see :mod:`ai_service.models.faces.family` for names and file layouts.
"""

from ai_service.models.faces.arcface import ArcFaceRecognizer
from ai_service.models.faces.dlib_models import DlibFaceDetector, DlibFaceRecognizer
from ai_service.models.faces.family import DLIB, INSIGHTFACE_PACKS, FaceFamily
from ai_service.models.faces.scrfd import ScrfdDetector

__all__ = [
    "DLIB",
    "INSIGHTFACE_PACKS",
    "ArcFaceRecognizer",
    "DlibFaceDetector",
    "DlibFaceRecognizer",
    "FaceFamily",
    "ScrfdDetector",
]
