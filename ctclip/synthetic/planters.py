"""The lesion planters of the synthetic chest CT, in planting order: one per plantable CT-RATE finding.

A planter has two halves. `draw(rng, sites)` runs once per patient and returns plain parameters
(side, lobe, size in mm, density), so that every scan and reconstruction of the patient shows the same
finding; `plant(canvas, params, rng)` runs once per scan on the output grid, writes the lesion's HU
into `canvas.hu`, and returns the lesion mask and the facts the report needs (lobe, size, side), or
None when the finding cannot be placed in this scan (then its label is 0: labels stay honest).

All 18 CT-RATE findings have a planter. They are in `cardiovascular_planters`, `device_planters`,
`mediastinal_planters`, `lung_planters`, `airway_planters` and `interstitial_planters`; the
`Canvas` and geometry they share are in `canvas`. Every finding is sized to change a
64 x 64 x 32 volume (voxels of about 5.6 x 5.6 x 9.4 mm) visibly, with radiological sizes in mm on
fine grids.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ctclip.synthetic import airway_planters as airway
from ctclip.synthetic import cardiovascular_planters as cardio
from ctclip.synthetic import device_planters as device
from ctclip.synthetic import interstitial_planters as interstitial
from ctclip.synthetic import lung_planters as lung
from ctclip.synthetic import mediastinal_planters as mediastinum
from ctclip.synthetic.canvas import Canvas


@dataclass(frozen=True)
class Planter:
    """A finding's per-patient `draw` and per-scan `plant` (see the module docstring)."""

    name: str
    draw: Callable[[np.random.Generator, dict], dict]
    plant: Callable[[Canvas, dict, np.random.Generator], tuple[np.ndarray, dict] | None]


# planting order matters: the heart grows before anything is placed around it, the hernia before the
# pleural fluid (both push lung aside), fluid before the lung lesions (which then avoid it), diffuse
# lung changes after focal ones, and the mosaic patchwork last (it recolours whatever lung is left)
PLANTERS: dict[str, Planter] = {
    p.name: p
    for p in (
        Planter("Cardiomegaly", cardio.draw_cardiomegaly, cardio.plant_cardiomegaly),
        Planter("Coronary artery wall calcification", cardio.draw_coronary, cardio.plant_coronary),
        Planter("Pericardial effusion", cardio.draw_pericardial, cardio.plant_pericardial),
        Planter("Arterial wall calcification", cardio.draw_aortic_calc, cardio.plant_aortic_calc),
        Planter("Medical material", device.draw_material, device.plant_material),
        Planter("Lymphadenopathy", mediastinum.draw_lymph, mediastinum.plant_lymph),
        Planter("Hiatal hernia", mediastinum.draw_hernia, mediastinum.plant_hernia),
        Planter("Pleural effusion", lung.draw_pleural, lung.plant_pleural),
        Planter("Atelectasis", lung.draw_atelectasis, lung.plant_atelectasis),
        Planter("Consolidation", lung.draw_consolidation, lung.plant_consolidation),
        Planter("Lung nodule", lung.draw_nodule, lung.plant_nodule),
        Planter("Pulmonary fibrotic sequela", interstitial.draw_fibrotic, interstitial.plant_fibrotic),
        Planter("Bronchiectasis", airway.draw_bronchiectasis, airway.plant_bronchiectasis),
        Planter("Peribronchial thickening", airway.draw_peribronchial, airway.plant_peribronchial),
        Planter("Lung opacity", lung.draw_opacity, lung.plant_opacity),
        Planter("Emphysema", lung.draw_emphysema, lung.plant_emphysema),
        Planter("Interlobular septal thickening", interstitial.draw_septal, interstitial.plant_septal),
        Planter("Mosaic attenuation pattern", interstitial.draw_mosaic, interstitial.plant_mosaic),
    )
}
PLANTABLE: tuple[str, ...] = tuple(PLANTERS)
