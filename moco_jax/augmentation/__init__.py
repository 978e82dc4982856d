"""MoCo v2 aug+ on the accelerator and the torchvision-equivalent image ops it is made of."""
