"""What the scripts share, one concern per module. Scripts import from here; nothing here imports a script.

audio        seeking reads at 16 kHz mono, resampling, downmix, the conv encoder's frame geometry
manifests    scan, validate and split recordings by participant; TSV manifests
crops        CropStream: silence-filtered random crops of long recordings (pretraining data)
training     flags and recipes, the Accelerator, loaders, logs, optimizer groups, SIGTERM, clean exit
checkpoints  atomic checkpoints: save, list, resolve 'latest', load
cards        model-card figures, versions, hardware; the Hub push
"""
