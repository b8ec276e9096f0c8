"""``lungudrnet lung-mask``: write the automatic lung mask of a chest CT (see :mod:`.lung_mask`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import progress_events
from .errors import OutputError

OUT_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")  # one file each (a detached header would name a temporary)


def add_lung_mask_parser(subparsers) -> None:
    parser = subparsers.add_parser("lung-mask", help="write an automatic lung mask of a chest CT")
    parser.add_argument("--image", required=True, help="chest CT in HU (NIfTI, NRRD, MHA or DICOM folder)")
    parser.add_argument("--out", required=True, help="mask file to write (uint8 0/1 on the CT's grid): "
                                                     ".nii.gz, .nii, .nrrd or .mha")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing mask file")
    parser.set_defaults(run=run_lung_mask)


def run_lung_mask(args: argparse.Namespace) -> None:
    # Imported here so that the other commands do not pay for nibabel and scipy.
    from .io import atomic_path, read_image, save_image
    from .lung_mask import lung_mask, mask_volume_ml

    out = Path(args.out)
    if not out.name.lower().endswith(OUT_SUFFIXES):
        raise OutputError(f"output {out}: not a mask file name; end it with one of {', '.join(OUT_SUFFIXES)}")
    if out.resolve() == Path(args.image).resolve():
        raise OutputError(f"output {out}: is also the input image; choose another --out file")
    with atomic_path(out, args.overwrite) as temporary:  # refuses an existing --out before the work
        mask = lung_mask(read_image(args.image, "image"), f"image {args.image}")
        save_image(mask, temporary)
    progress_events.emit("result", paths={"lung_mask": str(out)})
    print(f"lung volume {mask_volume_ml(mask):.0f} mL, mask written to {out}")
