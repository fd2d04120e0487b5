"""ArcFace face recogniser (InsightFace ``w600k_r50`` / ``w600k_mbf`` / ``glintr100``) and its alignment.

As InsightFace's ``norm_crop`` + ``ArcFaceONNX.get_feat`` (and Immich's numpy port of them):

* the 5 detector landmarks are mapped onto the standard 112x112 ArcFace template with a least-squares
  similarity transform (Umeyama, the same estimator as ``skimage.transform.SimilarityTransform``;
  OpenCV's ``estimateAffinePartial2D`` is robust-fitted, so it can differ slightly);
* ``cv2.warpAffine`` (bilinear, black border), RGB, ``(x - 127.5) / 127.5``, NCHW float32;
* the raw 512-d output is returned: Immich stores un-normalised ArcFace vectors (norm ~6–25) and
  compares them by cosine distance.

Faces of one image go through the model together when its batch axis is dynamic; a model exported
with a fixed batch size is fed that many at a time (the last chunk zero-padded). With batching on
(:mod:`ai_service.runtime.batching`), the faces of concurrent requests share runs too: alignment and
blob conversion stay in each request's thread, and each request gets back exactly its own rows.
"""

from __future__ import annotations

import cv2
import numpy as np
import onnxruntime as ort

from ai_service.models.base import FaceDetections, ModelLoadError
from ai_service.runtime.batching import BatchOptions, MicroBatcher, make_batcher

EMBEDDING_SIZE = 512
CROP_SIZE = 112
INPUT_MEAN = 127.5
INPUT_STD = 127.5

# InsightFace's arcface_dst: left eye, right eye, nose tip, left and right mouth corners (112x112).
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    np.float32,
)


def umeyama(src: np.ndarray, dst: np.ndarray, estimate_scale: bool = True) -> np.ndarray:
    """Least-squares similarity transform mapping ``src`` (N x 2) onto ``dst``; 3 x 3 homogeneous.

    Umeyama (1991), "Least-squares estimation of transformation parameters between two point
    patterns", eq. 40-41; line for line what scikit-image does, so results match InsightFace.
    """
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    num, dim = src.shape
    src_mean = src.mean(axis=0)
    dst_mean = dst.mean(axis=0)
    src_demean = src - src_mean
    dst_demean = dst - dst_mean
    a = dst_demean.T @ src_demean / num
    d = np.ones((dim,), np.float64)
    if np.linalg.det(a) < 0:
        d[dim - 1] = -1
    t = np.eye(dim + 1, dtype=np.float64)
    u, s, v = np.linalg.svd(a)
    rank = np.linalg.matrix_rank(a)
    if rank == 0:
        return np.full_like(t, np.nan)
    if rank == dim - 1:
        if np.linalg.det(u) * np.linalg.det(v) > 0:
            t[:dim, :dim] = u @ v
        else:
            saved = d[dim - 1]
            d[dim - 1] = -1
            t[:dim, :dim] = u @ np.diag(d) @ v
            d[dim - 1] = saved
    else:
        t[:dim, :dim] = u @ np.diag(d) @ v
    scale = 1.0 / src_demean.var(axis=0).sum() * (s @ d) if estimate_scale else 1.0
    t[:dim, dim] = dst_mean - scale * (t[:dim, :dim] @ src_mean.T)
    t[:dim, :dim] *= scale
    return t


def estimate_norm(landmarks: np.ndarray, image_size: int = CROP_SIZE) -> np.ndarray:
    """2 x 3 affine matrix that aligns 5 landmarks to the ArcFace template scaled to ``image_size``."""
    if landmarks.shape != (5, 2):
        raise ValueError(f"expected 5 x 2 landmarks, got {landmarks.shape}")
    if image_size % 112 == 0:
        ratio, diff_x = image_size / 112.0, 0.0
    elif image_size % 128 == 0:
        ratio = image_size / 128.0
        diff_x = 8.0 * ratio
    else:
        raise ValueError("image_size must be a multiple of 112 or 128")
    dst = ARCFACE_TEMPLATE * ratio
    dst[:, 0] += diff_x
    return umeyama(landmarks, dst)[:2, :]


# OpenCV's warps refuse source images with a side of 32767 px or more (SHRT_MAX): a panorama of that
# width is a valid image, so the face is warped from its own neighbourhood instead.
_WARP_MAX_SIDE = 32766


def norm_crop(image: np.ndarray, landmarks: np.ndarray, image_size: int = CROP_SIZE) -> np.ndarray:
    """The aligned ``image_size`` x ``image_size`` face crop (uint8, same channel order as ``image``)."""
    matrix = estimate_norm(np.asarray(landmarks, np.float64), image_size)
    h, w = image.shape[:2]
    if max(h, w) <= _WARP_MAX_SIDE:
        return cv2.warpAffine(image, matrix, (image_size, image_size), borderValue=0.0)
    # Source pixels the crop samples: its corners mapped back, plus one pixel for bilinear interpolation.
    # Pixels outside them cannot reach the crop, so warping this window alone gives the same crop.
    inverse = cv2.invertAffineTransform(matrix)
    corners = np.array([[0, 0, 1], [image_size, 0, 1], [0, image_size, 1], [image_size, image_size, 1]], np.float64)
    source = corners @ inverse.T
    x0, y0 = (max(0, int(np.floor(v)) - 2) for v in source.min(axis=0))
    x1, y1 = (min(n, int(np.ceil(v)) + 3) for v, n in zip(source.max(axis=0), (w, h), strict=True))
    if x1 <= x0 or y1 <= y0 or max(x1 - x0, y1 - y0) > _WARP_MAX_SIDE:
        return np.zeros((image_size, image_size, *image.shape[2:]), image.dtype)  # nothing of the image in it
    shifted = matrix.copy()
    shifted[:, 2] += matrix[:, :2] @ np.array([x0, y0], np.float64)
    return cv2.warpAffine(image[y0:y1, x0:x1], shifted, (image_size, image_size), borderValue=0.0)


def to_blob(crops: np.ndarray) -> np.ndarray:
    """N x 112 x 112 x 3 uint8 -> N x 3 x 112 x 112 float32, ``(x - 127.5) / 127.5``."""
    blob = (crops.astype(np.float32) - INPUT_MEAN) / INPUT_STD
    return np.ascontiguousarray(blob.transpose(0, 3, 1, 2))


class ArcFaceRecognizer:
    """An ArcFace ONNX session behind :class:`~ai_service.models.base.FaceRecognizerModel`.

    ``max_batch_size`` caps how many faces go through the model in one run (Immich's
    ``MAX_BATCH_SIZE__FACIAL_RECOGNITION``); ``None`` runs all faces of an image at once.
    ``batching`` lets concurrent ``embed`` calls share runs (its ``max_size`` counts faces).
    """

    embedding_size = EMBEDDING_SIZE

    def __init__(
        self,
        session: ort.InferenceSession,
        max_batch_size: int | None = None,
        batching: BatchOptions | None = None,
    ) -> None:
        self.session = session
        inputs = session.get_inputs()
        outputs = session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise ModelLoadError("ArcFace model must have one input and an embedding output")
        shape = inputs[0].shape
        if len(shape) != 4 or tuple(shape[1:]) != (3, CROP_SIZE, CROP_SIZE):
            raise ModelLoadError(f"ArcFace input must be N x 3 x 112 x 112, is {shape}")
        out_shape = outputs[0].shape
        if not out_shape or out_shape[-1] != EMBEDDING_SIZE:
            raise ModelLoadError(
                f"face recognition model outputs {out_shape}; Immich's face_search column needs {EMBEDDING_SIZE}-d"
            )
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        batch = shape[0]
        # A fixed batch axis (export-time constant, usually 1) forces chunks of exactly that size.
        self.fixed_batch: int | None = batch if isinstance(batch, int) and batch > 0 else None
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.max_batch_size = max_batch_size
        self.batcher: MicroBatcher[np.ndarray, np.ndarray] | None = make_batcher(
            batching or BatchOptions(),
            session,
            self._run_blobs,
            fixed_batch=self.fixed_batch,
            name="ArcFace recognition",
            weight=len,  # an item is one image's faces: they count one each against the batch size
        )

    def crops(self, image: np.ndarray, faces: FaceDetections) -> np.ndarray:
        """N x 112 x 112 x 3 aligned crops."""
        if faces.landmarks is None:
            raise ValueError("ArcFace recognition needs 5-point landmarks; this detector returned none")
        if len(faces) == 0:
            return np.zeros((0, CROP_SIZE, CROP_SIZE, 3), np.uint8)
        image = np.ascontiguousarray(image, dtype=np.uint8)  # cv2 rejects views with negative strides
        return np.stack([norm_crop(image, lm) for lm in faces.landmarks])

    def embed(self, image: np.ndarray, faces: FaceDetections) -> np.ndarray:
        if len(faces) == 0:
            return np.zeros((0, EMBEDDING_SIZE), np.float32)
        return self.embed_crops(self.crops(image, faces))

    def embed_crops(self, crops: np.ndarray) -> np.ndarray:
        """Aligned crops -> N x 512 raw embeddings."""
        blob = to_blob(crops)
        if self.batcher is None or blob.shape[0] == 0:
            return self._embed_blob(blob)
        return self.batcher.submit(blob)

    def _run_blobs(self, blobs: list[np.ndarray]) -> list[np.ndarray]:
        # The batcher's call: the faces of every queued request in one go, split back per request.
        rows = self._embed_blob(np.concatenate(blobs))
        bounds = np.cumsum([len(b) for b in blobs])[:-1]
        return np.split(rows, bounds)

    def _embed_blob(self, blob: np.ndarray) -> np.ndarray:
        count = blob.shape[0]
        if count == 0:
            return np.zeros((0, EMBEDDING_SIZE), np.float32)
        # A fixed batch axis dictates the chunk; otherwise the configured cap, or everything at once.
        chunk = self.fixed_batch if self.fixed_batch is not None else self.max_batch_size or count
        results: list[np.ndarray] = []
        for start in range(0, count, chunk):
            part = blob[start : start + chunk]
            real = part.shape[0]
            if self.fixed_batch is not None and real < chunk:
                part = np.concatenate([part, np.zeros((chunk - real, *part.shape[1:]), np.float32)])
            out = self.session.run([self.output_name], {self.input_name: part})[0]
            results.append(np.asarray(out, np.float32).reshape(out.shape[0], -1)[:real])
        return np.concatenate(results)
