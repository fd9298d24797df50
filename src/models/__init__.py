"""Networks and what trains them: any smp/timm segmentation model, U-TAE and the early S2 channels,
weights files and warm starts, the loss."""
