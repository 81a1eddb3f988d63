"""Text of the synthetic CT-RATE tables: radiology reports and metadata rows.

Reports are written from what was actually planted (`details` from the planters): the lobe and size
of a nodule, the side and amount of an effusion. Wording varies (several phrasings per finding, organ
paragraphs in random order), some absent findings are mentioned negatively ("No pleural effusion."),
and a configurable share of impressions is empty (half NaN, half "Not given.") as in CT-RATE.
A negation is never written for a finding that is present.
"""

from __future__ import annotations

import datetime as dt

import numpy as np

from ctclip.findings import FINDINGS

REPORT_COLUMNS: tuple[str, ...] = (
    "VolumeName",
    "ClinicalInformation_EN",
    "Technique_EN",
    "Findings_EN",
    "Impressions_EN",
)

# CT-RATE metadata columns, in the order of the released validation_metadata.csv (44 columns)
METADATA_COLUMNS: tuple[str, ...] = (
    "VolumeName",
    "Manufacturer",
    "SeriesDescription",
    "ManufacturerModelName",
    "PatientSex",
    "PatientAge",
    "ReconstructionDiameter",
    "DistanceSourceToDetector",
    "DistanceSourceToPatient",
    "GantryDetectorTilt",
    "TableHeight",
    "RotationDirection",
    "ExposureTime",
    "XRayTubeCurrent",
    "Exposure",
    "FilterType",
    "GeneratorPower",
    "FocalSpots",
    "ConvolutionKernel",
    "PatientPosition",
    "RevolutionTime",
    "SingleCollimationWidth",
    "TotalCollimationWidth",
    "TableSpeed",
    "TableFeedPerRotation",
    "SpiralPitchFactor",
    "DataCollectionCenterPatient",
    "ReconstructionTargetCenterPatient",
    "ExposureModulationType",
    "CTDIvol",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "SliceLocation",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "XYSpacing",
    "RescaleIntercept",
    "RescaleSlope",
    "RescaleType",
    "NumberofSlices",
    "ZSpacing",
    "StudyDate",
)

NOT_GIVEN = "Not given."


def _pick(rng: np.random.Generator, options: list[str] | tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


# ---- sentences for present findings (each a function of the planted details) ---------------------


def _nodule(d: dict, rng) -> str:
    big = d["largest"]
    if d["count"] > 1:
        return _pick(
            rng,
            (
                f"{d['count']} solid nodules are seen in the lungs, the largest in the {big['lobe']} measuring {big['diameter_mm']} mm.",
                f"Multiple ({d['count']}) soft tissue density nodules are present; the largest measures {big['diameter_mm']} mm "
                f"in the {big['lobe']}.",
            ),
        )
    return _pick(
        rng,
        (
            f"A solid nodule measuring {big['diameter_mm']} mm is seen in the {big['lobe']}.",
            f"There is a {big['diameter_mm']} mm soft tissue nodule in the {big['lobe']}.",
            f"In the {big['lobe']}, a well-circumscribed nodule of {big['diameter_mm']} mm in diameter was observed.",
        ),
    )


def _effusion(d: dict, rng) -> str:
    where = "bilateral" if d["side"] == "bilateral" else f"{d['side']}-sided"
    return _pick(
        rng,
        (
            f"A {d['amount']} {where} pleural effusion is present, reaching {d['depth_mm']} mm in depth.",
            f"{d['amount'].capitalize()} pleural effusion is noted on the {'both sides' if d['side'] == 'bilateral' else d['side'] + ' side'}, "
            "layering in the dependent posterior costophrenic recess.",
            f"Pleural fluid of {d['amount']} volume is seen in the {'bilateral hemithoraces' if d['side'] == 'bilateral' else d['side'] + ' hemithorax'}.",
        ),
    )


POSITIVE = {
    "Cardiomegaly": lambda d, rng: _pick(
        rng,
        (
            "The heart is enlarged (cardiomegaly).",
            f"Cardiomegaly is present, with a cardiothoracic ratio of about {d['ctr']:.2f}.",
            "Heart size is increased.",
        ),
    ),
    "Pericardial effusion": lambda d, rng: _pick(
        rng,
        (
            f"Pericardial effusion reaching {d['thickness_mm']} mm in thickness is observed.",
            "There is fluid in the pericardial space, consistent with pericardial effusion.",
            f"A pericardial effusion with a maximum thickness of {d['thickness_mm']} mm surrounds the heart.",
        ),
    ),
    "Arterial wall calcification": lambda d, rng: _pick(
        rng,
        (
            "Atherosclerotic calcifications are seen in the wall of the thoracic aorta.",
            f"{d['extent'].capitalize()} calcified atheromatous plaques are present in the aortic wall.",
            "Calcific atherosclerotic changes are noted in the thoracic aorta.",
        ),
    ),
    "Coronary artery wall calcification": lambda d, rng: _pick(
        rng,
        (
            f"Calcifications are observed along the course of the {d['vessel']}.",
            "Coronary artery calcification is present.",
            "Calcified plaques are seen in the coronary arteries.",
        ),
    ),
    "Medical material": lambda d, rng: _pick(
        rng,
        (
            f"A {d['device']} is seen with its tip in the {d['tip']}.",
            f"Central venous catheter in place, tip projecting over the {d['tip']}.",
        ),
    ),
    "Lymphadenopathy": lambda d, rng: _pick(
        rng,
        (
            f"Enlarged lymph nodes are seen in the {' and '.join(n['station'] for n in d['nodes'])} "
            f"region{'s' if len(d['nodes']) > 1 else ''}, the largest measuring {d['largest_mm']} mm in short axis.",
            f"Mediastinal lymphadenopathy is present ({', '.join(n['station'] for n in d['nodes'])}), "
            f"up to {d['largest_mm']} mm in short axis.",
            f"Pathologically enlarged lymph node{'s' if len(d['nodes']) > 1 else ''} with a short axis of up to "
            f"{d['largest_mm']} mm {'are' if len(d['nodes']) > 1 else 'is'} observed in the mediastinum.",
        ),
    ),
    "Pleural effusion": _effusion,
    "Atelectasis": lambda d, rng: _pick(
        rng,
        (
            f"Subsegmental atelectasis is seen in the dependent part of the {d['lobe']}.",
            f"Band-like atelectatic changes are present in the posterior basal {d['lobe']}.",
            f"Atelectasis is observed in the {d['lobe']}.",
        ),
    ),
    "Consolidation": lambda d, rng: _pick(
        rng,
        (
            f"A consolidation area is seen in the {d['lobe']}"
            + (" with air bronchograms." if d["air_bronchogram"] else "."),
            f"There is consolidation in the {d['lobe']}, compatible with pneumonia.",
            f"A dense parenchymal consolidation is observed in the {d['lobe']}.",
        ),
    ),
    "Lung nodule": _nodule,
    "Lung opacity": lambda d, rng: _pick(
        rng,
        (
            f"Ground-glass opacities are seen in the {' and '.join(d['lobes'])}.",
            f"Patchy ground-glass density increases are present in the {' and '.join(d['lobes'])}.",
            f"Areas of increased density in ground-glass pattern are noted in the {' and '.join(d['lobes'])}.",
        ),
    ),
    "Emphysema": lambda d, rng: _pick(
        rng,
        (
            f"{d['severity'].capitalize()} centrilobular emphysema is present, predominantly in the upper lobes.",
            "Emphysematous changes are seen in both lungs, more prominent in the upper lobes.",
            f"Low-attenuation areas consistent with {d['severity']} emphysema are observed.",
        ),
    ),
}

IMPRESSION = {
    "Cardiomegaly": ("Cardiomegaly.", "Enlarged heart."),
    "Pericardial effusion": ("Pericardial effusion.", "Pericardial fluid."),
    "Arterial wall calcification": ("Aortic atherosclerosis.", "Atherosclerotic calcification of the aorta."),
    "Coronary artery wall calcification": ("Coronary artery calcification.", "Coronary atherosclerosis."),
    "Medical material": ("Central venous catheter in place.",),
    "Lymphadenopathy": ("Mediastinal lymphadenopathy.", "Enlarged mediastinal lymph nodes."),
    "Pleural effusion": ("Pleural effusion.",),
    "Atelectasis": ("Atelectasis.", "Subsegmental atelectasis."),
    "Consolidation": ("Consolidation, pneumonia?", "Pneumonic consolidation."),
    "Lung nodule": ("Pulmonary nodule.", "Lung nodule; follow-up is recommended."),
    "Lung opacity": ("Ground-glass opacities.", "Ground-glass densities in the lungs."),
    "Emphysema": ("Emphysema.", "Centrilobular emphysema."),
}

NEGATIVE = {
    "Medical material": ("No catheter or other medical device is seen.",),
    "Arterial wall calcification": (
        "No calcification is seen in the aortic wall.",
        "The thoracic aorta shows no atherosclerotic calcification.",
    ),
    "Cardiomegaly": ("Heart size is normal.", "The heart is of normal size.", "No cardiomegaly."),
    "Pericardial effusion": ("No pericardial effusion.", "There is no pericardial effusion or thickening."),
    "Coronary artery wall calcification": ("No coronary artery calcification was detected.",),
    "Hiatal hernia": (
        "No hiatal hernia.",
        "The esophagus is normal in course and calibre; no hiatal hernia.",
    ),
    "Lymphadenopathy": (
        "No pathologically enlarged lymph nodes in the mediastinum or hila.",
        "No mediastinal or hilar lymphadenopathy.",
        "No lymph node of pathological size was detected.",
    ),
    "Emphysema": ("No emphysema.", "No emphysematous change is seen in the lungs."),
    "Atelectasis": ("No atelectasis.", "No atelectatic change."),
    "Lung nodule": (
        "No pulmonary nodule was detected.",
        "No nodular lesion is seen in either lung.",
        "No lung nodule.",
    ),
    "Lung opacity": (
        "No ground-glass opacity.",
        "No infiltrative or ground-glass opacity is seen in the lungs.",
    ),
    "Pulmonary fibrotic sequela": ("No fibrotic sequelae.", "No fibrotic band or scar is seen."),
    "Pleural effusion": (
        "No pleural effusion.",
        "No pleural effusion or thickening.",
        "Pleural spaces are clear.",
    ),
    "Mosaic attenuation pattern": ("No mosaic attenuation pattern.",),
    "Peribronchial thickening": ("No peribronchial thickening.", "Bronchial walls are not thickened."),
    "Consolidation": ("No consolidation.", "No pneumonic consolidation is seen."),
    "Bronchiectasis": ("No bronchiectasis.", "No bronchial dilatation."),
    "Interlobular septal thickening": ("No interlobular septal thickening.",),
}
assert set(NEGATIVE) == set(FINDINGS)

SECTIONS = {
    "airways": (
        (),
        (
            "Trachea and both main bronchi are in the midline and patent.",
            "The trachea and main bronchi are open; no endobronchial lesion.",
            "Central airways are patent.",
        ),
        ("Bronchiectasis", "Peribronchial thickening"),
    ),
    "heart": (
        (
            "Cardiomegaly",
            "Pericardial effusion",
            "Coronary artery wall calcification",
            "Arterial wall calcification",
            "Medical material",
        ),
        (
            "Mediastinal vascular structures are of normal calibre.",
            "The main vascular structures of the mediastinum are normal in width.",
            "Thoracic aorta is of normal diameter.",
        ),
        (
            "Cardiomegaly",
            "Pericardial effusion",
            "Coronary artery wall calcification",
            "Arterial wall calcification",
            "Medical material",
        ),
    ),
    "mediastinum": (
        ("Lymphadenopathy",),
        (
            "The thyroid gland and esophagus are unremarkable in the included sections.",
            "No mediastinal mass.",
        ),
        ("Lymphadenopathy", "Hiatal hernia"),
    ),
    "lungs": (
        ("Lung nodule", "Consolidation", "Lung opacity", "Emphysema", "Atelectasis"),
        (
            "Lung aeration is otherwise normal.",
            "The remaining lung parenchyma is unremarkable.",
            "No mass lesion is seen in the lung parenchyma.",
        ),
        (
            "Lung nodule",
            "Consolidation",
            "Lung opacity",
            "Emphysema",
            "Atelectasis",
            "Pulmonary fibrotic sequela",
            "Mosaic attenuation pattern",
            "Interlobular septal thickening",
        ),
    ),
    "pleura": (("Pleural effusion",), ("No pneumothorax.",), ("Pleural effusion",)),
    "abdomen": (
        (),
        (
            "Upper abdominal organs in the sections are unremarkable.",
            "No pathology is seen in the upper abdominal sections included in the field of view.",
            "The liver, spleen and adrenal glands in the sections are normal.",
        ),
        (),
    ),
    "bones": (
        (),
        (
            "No lytic or destructive lesion in the bones.",
            "Bony structures are intact.",
            "Degenerative changes are seen in the thoracic spine.",
        ),
        (),
    ),
}

CLINICAL = (
    "Cough.",
    "Shortness of breath.",
    "Chest pain.",
    "Fever and cough.",
    "Follow-up.",
    "Dyspnea.",
    "Malignancy screening.",
    "Known COPD.",
    "Trauma.",
    "Weight loss.",
    NOT_GIVEN,
)


def _paragraph(section: str, details: dict[str, dict], rng: np.random.Generator) -> str:
    positives, normals, negatables = SECTIONS[section]
    sentences = [POSITIVE[n](details[n], rng) for n in positives if n in details]
    negs = [_pick(rng, NEGATIVE[n]) for n in negatables if n not in details and rng.random() < 0.65]
    if not sentences or rng.random() < 0.5:
        sentences.append(_pick(rng, normals))
    return " ".join(sentences + [negs[i] for i in rng.permutation(len(negs))])


def compose_report(
    details: dict[str, dict], rng: np.random.Generator, z_spacing: float, empty_impression_rate: float
) -> dict[str, object]:
    """The four report sections for one scan, from what was planted in it."""
    order = rng.permutation(list(SECTIONS))
    findings = " ".join(p for s in order if (p := _paragraph(str(s), details, rng)))
    present = [n for n in FINDINGS if n in details]
    if rng.random() < empty_impression_rate:
        impressions: object = float("nan") if rng.random() < 0.5 else NOT_GIVEN
    elif present:
        impressions = " ".join(_pick(rng, IMPRESSION[n]) for n in present)
    else:
        impressions = _pick(
            rng, ("No significant pathology.", "Normal chest CT.", "No acute cardiopulmonary finding.")
        )
    technique = _pick(
        rng,
        (
            f"Contrast-enhanced thorax CT, axial sections of {z_spacing:.2f} mm.",
            f"Thorax CT after intravenous contrast injection; images were reconstructed at {z_spacing:.2f} mm slice interval.",
            f"Axial images of the chest were obtained after IV contrast with a section thickness of {z_spacing:.2f} mm.",
        ),
    )
    return {
        "ClinicalInformation_EN": _pick(rng, CLINICAL),
        "Technique_EN": technique,
        "Findings_EN": findings,
        "Impressions_EN": impressions,
    }


# ---- metadata -------------------------------------------------------------------------------------

SCANNERS = {  # manufacturer -> models, kernels (standard, sharp, soft), filter, source distances
    "Philips": (("iCT 256", "Ingenuity CT", "Brilliance 64"), ("B", "YA", "A"), "B", ("", "")),
    "SIEMENS": (
        ("SOMATOM Definition Edge", "SOMATOM go.Top"),
        ("Br40d", "Bl57d", "Br36d"),
        "FLAT",
        (1085.6, 595.0),
    ),
    "GE MEDICAL SYSTEMS": (
        ("Revolution EVO", "Optima CT660"),
        ("STANDARD", "LUNG", "SOFT"),
        "BODY FILTER",
        (946.7, 541.0),
    ),
    "TOSHIBA": (("Aquilion ONE",), ("FC08", "FC52", "FC03"), "LARGE", (1072.0, 600.0)),
}
SERIES = {"standard": "THORAX", "sharp": "HRCT LUNG", "soft": "THORAX SOFT TISSUE"}


def draw_scanner(rng: np.random.Generator) -> dict:
    maker = str(_pick(rng, tuple(SCANNERS)))
    models, kernels, filt, (sdd, sdp) = SCANNERS[maker]
    pitch = float(rng.choice([0.8, 0.9, 1.0, 1.2, 1.4]))
    return {
        "Manufacturer": maker,
        "ManufacturerModelName": _pick(rng, models),
        "kernels": kernels,
        "FilterType": filt,
        "DistanceSourceToDetector": sdd,
        "DistanceSourceToPatient": sdp,
        "TableHeight": round(float(rng.uniform(110, 190)), 1),
        "ExposureTime": int(rng.integers(300, 1000)),
        "XRayTubeCurrent": int(rng.integers(80, 350)),
        "Exposure": int(rng.integers(40, 250)),
        "RevolutionTime": float(rng.choice([0.33, 0.5, 0.75])),
        "SpiralPitchFactor": pitch,
        "CTDIvol": round(float(rng.uniform(3.0, 14.0)), 6),
        "ExposureModulationType": _pick(rng, ("Z DOM", "XYZ_EC", "NONE", "")),
    }


def _lps(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, dtype=float) * [-1.0, -1.0, 1.0]


def _vec(v) -> str:
    return "[" + ", ".join(f"{float(x) + 0.0:.10g}" for x in v) + "]"  # + 0.0: no "-0"


def metadata_row(
    name: str,
    patient: dict,
    scanner: dict,
    kernel: str,
    affine: np.ndarray,
    shape: tuple[int, ...],
    intercept: int,
    study_date: dt.date,
) -> dict:
    """One metadata row for a volume as stored on disk (geometry from its affine, DICOM LPS)."""
    sp = np.linalg.norm(affine[:3, :3], axis=0)
    ipp = _lps(affine[:3, 3])
    iop = np.concatenate([_lps(affine[:3, 0] / sp[0]), _lps(affine[:3, 1] / sp[1])])
    centre = _lps(affine[:3, :3] @ ((np.asarray(shape) - 1) / 2) + affine[:3, 3])
    xy = float(sp[0])
    k = ("standard", "sharp", "soft").index(kernel)
    return {
        "VolumeName": name,
        "Manufacturer": scanner["Manufacturer"],
        "SeriesDescription": SERIES[kernel],
        "ManufacturerModelName": scanner["ManufacturerModelName"],
        "PatientSex": patient["sex"],
        "PatientAge": f"{patient['age']:03d}Y",
        "ReconstructionDiameter": round(xy * max(shape[:2]), 2),
        "DistanceSourceToDetector": scanner["DistanceSourceToDetector"],
        "DistanceSourceToPatient": scanner["DistanceSourceToPatient"],
        "GantryDetectorTilt": 0,
        "TableHeight": scanner["TableHeight"],
        "RotationDirection": "CW",
        "ExposureTime": scanner["ExposureTime"],
        "XRayTubeCurrent": scanner["XRayTubeCurrent"],
        "Exposure": scanner["Exposure"],
        "FilterType": scanner["FilterType"],
        "GeneratorPower": "",
        "FocalSpots": "",
        "ConvolutionKernel": scanner["kernels"][k],
        "PatientPosition": "HFS",
        "RevolutionTime": scanner["RevolutionTime"],
        "SingleCollimationWidth": 0.625,
        "TotalCollimationWidth": 40.0,
        "TableSpeed": round(40.0 * scanner["SpiralPitchFactor"] / scanner["RevolutionTime"], 3),
        "TableFeedPerRotation": round(40.0 * scanner["SpiralPitchFactor"], 3),
        "SpiralPitchFactor": scanner["SpiralPitchFactor"],
        "DataCollectionCenterPatient": _vec(np.round(centre, 4)),
        "ReconstructionTargetCenterPatient": _vec(np.round(centre, 4)),
        "ExposureModulationType": scanner["ExposureModulationType"],
        "CTDIvol": scanner["CTDIvol"],
        "ImagePositionPatient": _vec(np.round(ipp, 5)),
        "ImageOrientationPatient": _vec(np.round(iop, 6)),
        "SliceLocation": round(float(ipp[2]), 5),
        "SamplesPerPixel": 1,
        "PhotometricInterpretation": "MONOCHROME2",
        "Rows": int(shape[1]),
        "Columns": int(shape[0]),
        "XYSpacing": _vec([xy, float(sp[1])]),
        "RescaleIntercept": intercept,
        "RescaleSlope": 1,
        "RescaleType": "",
        "NumberofSlices": int(shape[2]),
        "ZSpacing": float(round(sp[2], 6)),
        "StudyDate": study_date.strftime("%Y%m%d"),
    }
