"""Quality metrics: FID on the digit classifier's features, label accuracy, PSNR."""
