"""Export a finished run for serving: the selected model as a torch.export program, its preprocessing state in
a portable form, and its spec (``pipeline.export``), plus the program compiled for CPU by AOTInductor; ``pipeline.serving.Scorer`` loads the directory.

    python jobs/export.py --run outputs/ple --out export/ple
    python jobs/export.py --run outputs/esmm/checkpoint --out export/esmm
"""
from pipeline.export import main

if __name__ == "__main__":
    main()
