"""bf16 autocast keeps the SAN's gradients close to fp32 on a real-face batch (the training path's own step).

The check: one training step of the library's Learner (SAN width 1 at 64 px, the real face-api matcher
and an auxiliary CNN of the original design in the loss) in fp32 and in bf16; the SAN's gradients
must have cosine similarity >= 0.95 with fp32 for every parameter tensor and >= 0.99 for the whole
gradient. Measured on the development CPU: >= 0.979 per tensor, 0.997 overall. For scale: the fp32
gradients of the two halves of the same batch have cosine -0.12, so bf16 rounding is far below the
minibatch noise. With the frozen networks under autocast too, one tensor fell to 0.24 (0.93
overall): that is why only the SAN's forward runs in bf16 (train.Autocast).
"""
from __future__ import annotations

import torch
from fastai.callback.core import Callback

from flowsan_lib.core.config import SanParams
from flowsan_lib.method.fit import TensorLoader, build_learner, make_dls
from flowsan_lib.method.prototypes import make_bank, mean_faces
from flowsan_lib.method.san_training import StageData, frozen_for_loss, san_loss
from flowsan_lib.models.aux_cnn import AuxGenderCNN, freeze
from flowsan_lib.models.san import SAN

R = 64


class Grads(Callback):
    """Keeps the SAN's gradients of the first training batch, then stops."""
    order = 90

    def after_backward(self):
        self.kept = {k: p.grad.detach().clone() for k, p in self.learn.model.named_parameters()}
        from fastai.callback.core import CancelFitException
        raise CancelFitException()


def _grads(precision: str, data: StageData, g, matcher) -> dict:
    torch.manual_seed(1)
    san = SAN(R, 3, 1.0)
    sp = SanParams(batch_size=8, precision=precision)
    tl = TensorLoader(len(data), data.batch_fn("original"), 8, device=torch.device("cpu"))
    rec = Grads()
    learn = build_learner(san, make_dls(tl, tl, n_inp=3), san_loss(sp, g, matcher), cbs=[rec], precision=precision)
    learn.fit(1, 0.0)
    return rec.kept


def test_bf16_san_gradients_stay_close_to_fp32(tiny_faces_factory, faceapi_matcher):
    torch.set_num_threads(1)
    tf = tiny_faces_factory(R)
    x, y = tf.images(), torch.from_numpy(tf.gender).float()
    protos = mean_faces(tf.gray, tf.rgb, tf.landmarks, tf.gender)["tensors"]
    with torch.no_grad():
        desc = faceapi_matcher(x)
    data = StageData(x, x, desc, y, make_bank(protos, 3, False))
    torch.manual_seed(0)
    g = frozen_for_loss(freeze(AuxGenderCNN(R, "original", name="G01")), "cpu")
    m = frozen_for_loss(faceapi_matcher, "cpu")
    ref, bf = _grads("fp32", data, g, m), _grads("bf16", data, g, m)
    cos = {k: float(torch.nn.functional.cosine_similarity(ref[k].flatten(), bf[k].flatten(), 0)) for k in ref}
    flat = lambda d: torch.cat([t.flatten() for t in d.values()])
    total = float(torch.nn.functional.cosine_similarity(flat(ref), flat(bf), 0))
    assert all(v.abs().sum() > 0 for v in ref.values())
    assert min(cos.values()) >= 0.95, cos
    assert total >= 0.99, total
    assert not torch.equal(flat(ref), flat(bf))                       # bf16 really ran
