"""--precision int8: the UNet as a calibrated, symmetric int8 Q/DQ graph that TensorRT and ONNX Runtime both run.

- unet: the step a build runs (calibrate, choose the float nodes, quantize, gate, record);
- calibration: UNet inputs recorded from real sampling runs of the fp32 bundle being built;
- quantize: the Q/DQ rewrite and the choice of nodes kept float;
- gate: the quality gate on held-out generations.
"""
