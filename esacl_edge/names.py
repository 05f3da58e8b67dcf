"""Method and model names with one-line descriptions, importable without torch.

The command line takes its ``--method``/``--model`` choices and help from here;
``learn.methods.METHODS``, ``learn.ablations.ABLATIONS`` and ``models.build_model`` cover exactly
these names.
"""

from __future__ import annotations

# The methods a user chooses (``learn --method``), defined in ``learn.methods.METHODS``.
METHOD_DESCRIPTIONS: dict[str, str] = {
    "esacl": "EsaCL: IDS step selection, masked SAM (every 4th step), SDP pruning, DER++ replay (1.5 buffered "
             "samples per new one) from a reservoir buffer; the current samples' cross-entropy three quarters over "
             "the classes in their minibatch and a quarter over all classes, the classifier's bias calibrated on "
             "the buffer at each task end",
    "finetune": "dense baseline: plain fine-tuning, no replay",
    "ewc": "dense baseline: online EWC, no buffer",
    "er": "dense baseline: ER (experience replay) from a reservoir buffer",
    "er-ace": "dense baseline: ER-ACE (Caccia et al., 2022), ER whose new samples' cross-entropy competes only "
              "over the classes in their minibatch, so old classes are pushed down by replay alone",
    "derpp": "dense baseline: DER++ replay from a reservoir buffer, the update's gradient norm clipped at 20",
    "joint": "upper bound: keeps all data seen so far and trains on it at each task end",
    "sparcl": "SparCL-style sparse learner: task-aware dynamic masks (importance |w| + lambda |grad w|, "
              "pruned from the first chunk, prune-and-regrow every 2 chunks, extra capacity at a task start), "
              "dynamic data removal, dynamic gradient masking, DER++ replay as derpp's",
}

# Ablations and reference variants (``bench --methods``, for BENCHMARKS.md), defined in
# ``learn.ablations.ABLATIONS``; each says how it differs from the method it varies.
ABLATION_DESCRIPTIONS: dict[str, str] = {
    "esacl-noids": "EsaCL without IDS: every step trains on the whole minibatch (gamma = 1)",
    "esacl-nosam": "EsaCL without SAM: plain SGD steps (rho = 0)",
    "esacl-allclasses": "EsaCL with the current samples' cross-entropy over all classes only",
    "esacl-present": "EsaCL with the current samples' cross-entropy over the classes in their minibatch only",
    "esacl-sam2": "EsaCL with SAM on every other step",
    "esacl-nocalib": "EsaCL without the bias calibration at a task end",
    "esacl-replay1": "EsaCL replaying one buffered sample per new sample trained (DER++'s ratio)",
    "esacl-replay2": "EsaCL replaying two buffered samples per new sample trained (a replay batch as large as the "
                     "whole minibatch)",
    "esacl-warmup": "EsaCL with the first half of the first task dense and regrowth from 4 steps' dense gradients",
    "esacl-directional": "EsaCL pruning by SDP's directional score |-E[theta g] + theta^2 E[g^2] / 2| instead of "
                         "magnitude, after esacl-warmup's dense warm-up",
    "esacl-idsbuffer": "EsaCL with the class-balanced IDS buffer instead of reservoir",
    "esacl-erk": "EsaCL with Erdos-Renyi-kernel layer budgets (small layers kept denser) instead of uniform ones",
    "esacl-global": "EsaCL with one magnitude ranking over all layers (SparCL's allocation) instead of per-layer "
                    "budgets",
    "esacl-layerregrow": "EsaCL regrowing within each layer's budget instead of where |grad| is largest over all "
                         "layers",
    "esacl-early": "EsaCL with the first task's pruning schedule ending after 60% of its chunks, like a later "
                   "task's, instead of at its end",
    "esacl-layerregrow-early": "esacl-layerregrow and esacl-early together",
    "esacl-channels": "EsaCL pruning whole channels (small_cnn's conv2 channels and fc1 units, resnet18_reduced's "
                      "inner block channels) instead of single weights, so the pruned network is a narrower dense "
                      "one",
    "esacl-channels-sqrt": "EsaCL keeping the square root of each layer's density in whole channels (about 32% at "
                           "90% sparsity), pruned weight by weight within them to the density",
    "derpp-ace": "DER++ with EsaCL's loss: the current samples' cross-entropy over the classes in their minibatch "
                 "(ER-ACE's asymmetric cross-entropy)",
    "derpp-calib": "DER++ with EsaCL's bias calibration on the buffer at each task end",
    "sparcl-er": "SparCL-style sparse learner with ER replay instead of DER++",
    "sparcl-ewc": "SparCL-style sparse learner with online EWC instead of replay (no buffer)",
    "sparcl-ace": "SparCL-style sparse learner with EsaCL's loss, the current samples' cross-entropy over the "
                  "classes in their minibatch",
    "esacl-magnitude": "deprecated name of esacl",
    "esacl-reservoir": "deprecated name of esacl",
}

MODEL_DESCRIPTIONS: dict[str, str] = {
    "small_cnn": "two 3x3 conv blocks and a 2-layer MLP head, sized for 8x8 and 28x28 inputs (the default, "
                 "except for colour inputs of 32x32 or more)",
    "resnet18_reduced": "reduced ResNet-18 (width 20, as in GEM, DER and SparCL) for 32x32 colour images (the "
                        "default for colour inputs of 32x32 or more)",
    "mobilenet_v3_small": "torchvision MobileNetV3-Small (depthwise convolutions, squeeze-excitation, hardswish); "
                          "RGB, at least 32x32",
    "mobilenet_v3_large": "torchvision MobileNetV3-Large; RGB, at least 32x32",
    "mobilenet_v2": "torchvision MobileNetV2; RGB, at least 32x32",
    "resnet18": "torchvision ResNet-18 (ImageNet stem: 7x7 stride 2 and max-pooling); RGB, at least 32x32",
    "efficientnet_b0": "torchvision EfficientNet-B0 (SiLU, squeeze-excitation); RGB, at least 32x32",
}

METHOD_NAMES: tuple[str, ...] = tuple(METHOD_DESCRIPTIONS)
ABLATION_NAMES: tuple[str, ...] = tuple(ABLATION_DESCRIPTIONS)
MODEL_NAMES: tuple[str, ...] = tuple(MODEL_DESCRIPTIONS)
# Built by torchvision (``torchvision.models.get_model``); their ImageNet weights load with ``--init``.
TORCHVISION_MODELS: tuple[str, ...] = ("mobilenet_v3_small", "mobilenet_v3_large", "mobilenet_v2", "resnet18",
                                       "efficientnet_b0")
