"""What only the digits demo needs: scikit-learn's digits as images, and the tiny CLIPs it ships.

`weights/` holds the demo's pretrained tiny teacher and student (compact safetensors files, made by
`dho-pipeline pretrain-demo-clips`, which reproduces them bit for bit).
"""
