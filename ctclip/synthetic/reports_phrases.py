"""The sentences of the synthetic reports' findings sections (`ctclip.synthetic.reports` composes them):
per finding, how a planted one is described (a function of the planter's details) or named, how an
absent one is negated, alone or together with another absent finding, and how often.

`NEGATIVE[f]` lists every sentence that negates `f` (the tests check none appears when `f` is present).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ctclip.findings import FINDINGS


def pick(rng: np.random.Generator, options: list[str] | tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _join(items: list[str]) -> str:
    """ "a", "a and b", "a, b and c"."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def lobe_words(d: dict) -> str:
    """ "the right lower lobe", "the left upper lobe and right lower lobe", or "both lungs"."""
    lobes = list(d.get("lobes") or ([d["lobe"]] if d.get("lobe") else []))
    return "the " + _join(lobes) if lobes else "both lungs"


def _side_words(side: str | None, organ: str = "lung") -> str:
    if side in ("right", "left"):
        return f"the {side} {organ}"
    return f"both {organ}s"


# ---- sentences for planted findings (each a function of the planter's details) ------------------------

Sentence = Callable[[dict, np.random.Generator], str]


def _nodule(d: dict, rng) -> str:
    big = d.get("largest", {"lobe": "right upper lobe", "diameter_mm": 8})
    size, lobe = big["diameter_mm"], big["lobe"]
    if d.get("count", 1) > 1:
        return pick(rng, (
            f"{d['count']} solid nodules are observed in the lung parenchyma, the largest measuring {size} mm "
            f"in the {lobe}.",
            f"Multiple ({d['count']}) lung nodules are present; the largest is {size} mm in diameter in the {lobe}.",
            f"Nodules are seen in both lungs, the largest of which is in the {lobe} with a diameter of {size} mm.",
        ))
    return pick(rng, (
        f"A solid nodule measuring {size} mm is observed in the {lobe}.",
        f"There is a {size} mm lung nodule in the {lobe}.",
        f"A well-circumscribed pulmonary nodule {size} mm in diameter was detected in the {lobe}.",
        f"In the {lobe}, a soft tissue density nodule of {size} mm is present.",
    ))


def _pleural(d: dict, rng) -> str:
    side = d.get("side", "bilateral")
    amount = d.get("amount", "small")
    depth = d.get("depth_mm", 20)
    where = "bilateral" if side == "bilateral" else f"{side}-sided"
    space = "both pleural spaces" if side == "bilateral" else f"the {side} pleural space"
    return pick(rng, (
        f"A {amount} {where} pleural effusion is observed, {depth} mm at its thickest point.",
        f"Pleural effusion is present in {space}, reaching {depth} mm in depth.",
        f"{amount.capitalize()} pleural effusion is noted in {space}, layering posteriorly.",
        f"Fluid measuring up to {depth} mm is seen in {space}, consistent with pleural effusion.",
    ))


def _lymph(d: dict, rng) -> str:
    nodes = d.get("nodes") or [{"station": "subcarinal", "short_mm": 12}]
    stations = _join(list(dict.fromkeys(n["station"] for n in nodes)))
    largest = d.get("largest_mm", max(n["short_mm"] for n in nodes))
    plural = len(nodes) > 1
    return pick(rng, (
        f"Lymph node{'s' if plural else ''} of pathological size {'are' if plural else 'is'} observed in the "
        f"{stations} region{'s' if plural else ''}, the largest measuring {largest} mm in short axis.",
        f"Mediastinal lymphadenopathy is present ({stations}), up to {largest} mm in short axis.",
        f"Enlarged lymph nodes with a short axis of up to {largest} mm are seen in the mediastinum ({stations}).",
    ))


def _device(d: dict, rng) -> str:
    """The sentence for the planted device: its kind decides the wording, as in CT-RATE's reports."""
    device, tip = d.get("device", "central venous catheter"), d.get("tip", "superior vena cava")
    if device == "sternotomy wires":
        return pick(rng, (
            "Sternotomy wires are observed in the sternum.",
            "Median sternotomy with cerclage wires is seen.",
            "Medical material: sternotomy wires in place.",
        ))
    if device in ("cardiac pacemaker", "implantable cardioverter-defibrillator"):
        return pick(rng, (
            f"A {device} is observed in the chest wall with its lead{'s' if 'and' in tip else ''} extending "
            f"into the {tip}.",
            f"Medical material: {device} generator in the anterior chest wall, lead tip{'s' if 'and' in tip else ''}"
            f" in the {tip}.",
            f"{device.capitalize()} in place, its lead{'s' if 'and' in tip else ''} reaching the {tip}.",
        ))
    return pick(rng, (
        f"A {device} is observed with its tip in the {tip}.",
        f"Medical material is present: a {device} extending into the {tip}.",
        f"{device.capitalize()} in place, its tip projecting over the {tip}.",
    ))


POSITIVE: dict[str, Sentence] = {
    "Medical material": lambda d, rng: _device(d, rng),
    "Arterial wall calcification": lambda d, rng: pick(rng, (
        "Atherosclerotic calcific plaques are observed in the wall of the thoracic aorta.",
        "Arterial wall calcification is present in the thoracic aorta.",
        f"{d.get('extent', 'scattered').capitalize()} calcified atheromatous plaques are seen in the aortic wall.",
        "Calcifications are noted in the arterial wall of the aortic arch and descending aorta.",
    )),
    "Cardiomegaly": lambda d, rng: pick(rng, (
        "The heart is enlarged (cardiomegaly).",
        f"Cardiomegaly is observed, with a cardiothoracic ratio of about {d.get('ctr', 0.6):.2f}.",
        "Heart size is increased.",
        "Cardiomegaly is present.",
        "The cardiac contour is enlarged.",
    )),
    "Pericardial effusion": lambda d, rng: pick(rng, (
        f"Pericardial effusion reaching {d.get('thickness_mm', 8)} mm in thickness is observed.",
        "There is fluid in the pericardial space, consistent with pericardial effusion.",
        f"A pericardial effusion with a maximum thickness of {d.get('thickness_mm', 8)} mm surrounds the heart.",
        "Pericardial effusion is present.",
    )),
    "Coronary artery wall calcification": lambda d, rng: pick(rng, (
        f"Calcific plaques are observed along the {d.get('vessel', 'left anterior descending artery')}.",
        "Coronary artery wall calcification is present.",
        "Calcified atherosclerotic plaques are seen in the coronary artery walls.",
        "Calcifications are noted in the coronary arteries.",
    )),
    "Hiatal hernia": lambda d, rng: pick(rng, (
        f"A {d.get('kind', 'sliding')} type hiatal hernia of about {d.get('size_mm', 40)} mm is observed at the "
        "lower end of the esophagus.",
        "Hiatal hernia is present.",
        f"Part of the stomach has herniated through the esophageal hiatus (hiatal hernia, {d.get('size_mm', 40)} mm).",
        "A hiatal hernia containing air and fluid is seen behind the heart.",
    )),
    "Lymphadenopathy": _lymph,
    "Emphysema": lambda d, rng: pick(rng, (
        f"{d.get('severity', 'mild').capitalize()} centrilobular emphysema is observed, predominantly in the "
        "upper lobes.",
        "Emphysematous changes are seen in both lungs, more prominent in the upper lobes.",
        f"Low-attenuation areas consistent with {d.get('severity', 'mild')} emphysema are present.",
        "Emphysema is present in both lungs.",
    )),
    "Atelectasis": lambda d, rng: pick(rng, (
        f"Subsegmental atelectasis is seen in the dependent part of the {d.get('lobe', 'lower lobes')}.",
        f"Band-like atelectatic changes are present in the posterior {d.get('lobe', 'lower lobes')}.",
        f"Atelectasis is observed in the {d.get('lobe', 'lower lobes')}.",
    )),
    "Lung nodule": _nodule,
    "Lung opacity": lambda d, rng: pick(rng, (
        f"Ground-glass opacities are observed in {lobe_words(d)}.",
        f"Patchy ground-glass density increases are present in {lobe_words(d)}.",
        f"Lung opacity in ground-glass pattern is noted in {lobe_words(d)}.",
        f"Areas of increased density (opacity) are seen in {lobe_words(d)}.",
    )),
    "Pulmonary fibrotic sequela": lambda d, rng: pick(rng, (
        f"Fibrotic sequelae are observed in {lobe_words(d)}.",
        f"Band-like fibrotic scars (sequela changes) are seen in {lobe_words(d)}.",
        f"Pulmonary fibrotic sequela with linear densities extending to the pleura is present in {lobe_words(d)}.",
        f"Parenchymal fibrotic bands are noted in {lobe_words(d)}, compatible with sequelae.",
    )),
    "Pleural effusion": _pleural,
    "Mosaic attenuation pattern": lambda d, rng: pick(rng, (
        f"A mosaic attenuation pattern is observed in {_side_words(d.get('side'))}.",
        f"Mosaic attenuation is present in {lobe_words(d)}.",
        f"Areas of decreased and increased attenuation alternate in {_side_words(d.get('side'))} "
        "(mosaic attenuation pattern).",
    )),
    "Peribronchial thickening": lambda d, rng: pick(rng, (
        f"Peribronchial thickening is observed in {_side_words(d.get('side'))}.",
        f"The bronchial walls are thickened (peribronchial thickening) in {lobe_words(d)}.",
        f"Peribronchial thickening of up to {d.get('wall_mm', 4)} mm is present around the central bronchi.",
    )),
    "Bronchiectasis": lambda d, rng: pick(rng, (
        f"{d.get('kind', 'cylindrical').capitalize()} bronchiectasis is observed in {lobe_words(d)}.",
        f"Bronchiectasis is present in {lobe_words(d)}.",
        f"Dilated bronchi up to {d.get('lumen_mm', 10)} mm in lumen diameter are seen in {lobe_words(d)}, "
        "consistent with bronchiectasis.",
    )),
    "Consolidation": lambda d, rng: pick(rng, (
        f"An area of consolidation is seen in the {d.get('lobe', 'right lower lobe')}"
        + (" with air bronchograms." if d.get("air_bronchogram") else "."),
        f"There is consolidation in the {d.get('lobe', 'right lower lobe')}, compatible with pneumonia.",
        f"A dense parenchymal consolidation is observed in the {d.get('lobe', 'right lower lobe')}.",
    )),
    "Interlobular septal thickening": lambda d, rng: pick(rng, (
        f"Interlobular septal thickening is observed in the {d.get('zone', 'subpleural')} parts of "
        f"{_side_words(d.get('side'))}.",
        f"Thickened interlobular septa are seen in {lobe_words(d)}.",
        f"Septal thickening with a reticular pattern is present in {_side_words(d.get('side'))}, "
        f"{d.get('zone', 'subpleural')} predominant.",
    )),
}

# ---- sentences for absent findings -----------------------------------------------------------------

NEGATIVE: dict[str, tuple[str, ...]] = {
    "Medical material": (
        "No catheter or other medical material is seen.",
        "There is no medical device in the examined area.",
        "No medical material is present.",
    ),
    "Arterial wall calcification": (
        "No calcification was detected in the aortic wall.",
        "The thoracic aorta shows no atherosclerotic calcification.",
        "Arterial wall calcification is not observed.",
    ),
    "Cardiomegaly": (
        "Heart contour and size are normal.",
        "The heart is of normal size.",
        "No cardiomegaly was detected.",
        "Heart size is within normal limits.",
    ),
    "Pericardial effusion": (
        "No pericardial effusion was detected.",
        "There is no pericardial effusion or thickening.",
        "Pericardial effusion is not present.",
    ),
    "Coronary artery wall calcification": (
        "No coronary artery calcification was detected.",
        "The coronary arteries show no calcified plaque.",
        "Coronary artery wall calcification is not seen.",
    ),
    "Hiatal hernia": (
        "No hiatal hernia was detected.",
        "Thoracic esophagus calibration is normal and no hiatal hernia is seen.",
        "Hiatal hernia is not observed.",
    ),
    "Lymphadenopathy": (
        "No lymph node in pathological size and appearance was detected in the mediastinum or hilar regions.",
        "No mediastinal or hilar lymphadenopathy.",
        "No pathologically enlarged lymph node was observed.",
    ),
    "Emphysema": (
        "No emphysema was detected.",
        "No emphysematous change is seen in the lungs.",
        "Emphysema is not present.",
    ),
    "Atelectasis": (
        "No atelectasis was detected.",
        "There is no atelectatic change.",
        "Atelectasis is not seen.",
    ),
    "Lung nodule": (
        "No pulmonary nodule was detected.",
        "No nodular lesion is seen in either lung.",
        "There is no lung nodule.",
    ),
    "Lung opacity": (
        "No ground-glass opacity was detected.",
        "No infiltrative lesion or opacity is seen in the lungs.",
        "Lung opacity is not present.",
    ),
    "Pulmonary fibrotic sequela": (
        "No fibrotic sequelae were detected.",
        "No fibrotic band or scar is seen in the lungs.",
        "Pulmonary fibrotic sequela is not observed.",
    ),
    "Pleural effusion": (
        "No pleural effusion was detected.",
        "There is no pleural effusion or thickening.",
        "Pleural spaces are clear, without effusion.",
    ),
    "Mosaic attenuation pattern": (
        "No mosaic attenuation pattern was detected.",
        "Lung attenuation is homogeneous, without a mosaic pattern.",
        "Mosaic attenuation is not present.",
    ),
    "Peribronchial thickening": (
        "No peribronchial thickening was detected.",
        "The bronchial walls are not thickened.",
        "There is no peribronchial thickening.",
    ),
    "Consolidation": (
        "No consolidation was detected.",
        "No pneumonic consolidation is seen.",
        "There is no consolidation in either lung.",
    ),
    "Bronchiectasis": (
        "No bronchiectasis was detected.",
        "The bronchi are of normal calibre, without bronchiectasis.",
        "Bronchiectasis is not observed.",
    ),
    "Interlobular septal thickening": (
        "No interlobular septal thickening was detected.",
        "The interlobular septa are not thickened.",
        "There is no septal thickening.",
    ),
}

# Sentences on the finding's own name. CT-RATE's labels were read off the reports, so the label names are
# the radiologists' terms ("Mosaic attenuation pattern is observed in both lungs."). Half of the sentences
# about a finding use one of these frames, in both polarities, with no frame favoured.
POSITIVE_FRAMES = (
    "{X} is observed{where}.",
    "{X} is present{where}.",
    "{X} was detected{where}.",
    "There is {a}{x}{where}.",
    "{X} is seen{where}.",
)
NEGATIVE_FRAMES = (
    "No {x} was detected.",
    "{X} is not observed.",
    "There is no {x}.",
    "{X} is not present.",
    "{X} was not detected.",
    "No {x} is seen.",
)
NAME_RATE = 0.5
_COUNTABLE = ("Hiatal hernia", "Lung nodule", "Lung opacity", "Mosaic attenuation pattern")


def _where(finding: str, d: dict) -> str:
    if d.get("lobes") or d.get("lobe"):
        return f" in {lobe_words(d)}"
    if finding == "Lung nodule" and d.get("largest"):
        return f" in the {d['largest']['lobe']}"
    if finding == "Pleural effusion" and d.get("side") in ("left", "right"):
        return f" on the {d['side']} side"
    return ""


def _frame(frame: str, finding: str, d: dict | None = None) -> str:
    return frame.format(X=finding, x=finding.lower(), a="a " if finding in _COUNTABLE else "",
                        where=_where(finding, d or {}))


def _named(finding: str, describe: Sentence) -> Sentence:
    def sentence(d: dict, rng: np.random.Generator) -> str:
        if rng.random() < NAME_RATE:
            return _frame(pick(rng, POSITIVE_FRAMES), finding, d)
        return describe(d, rng)
    return sentence


POSITIVE = {f: _named(f, describe) for f, describe in POSITIVE.items()}
NEGATIVE = {f: tuple(dict.fromkeys(own + tuple(_frame(t, f) for t in NEGATIVE_FRAMES))) for f, own in NEGATIVE.items()}

# one sentence for two absent findings, as CT-RATE often writes them; used only when both are absent
JOINT_NEGATIVE: dict[tuple[str, str], tuple[str, ...]] = {
    ("Pleural effusion", "Pericardial effusion"): (
        "No pleural or pericardial effusion was detected.",
        "No pleural-pericardial effusion or thickening was detected.",
    ),
    ("Arterial wall calcification", "Coronary artery wall calcification"): (
        "No atherosclerotic calcification was detected in the aorta or coronary arteries.",
    ),
    ("Lung opacity", "Consolidation"): (
        "No infiltrative lesion, opacity or consolidation was detected in either lung.",
    ),
    ("Bronchiectasis", "Peribronchial thickening"): (
        "No bronchiectasis or peribronchial thickening was detected.",
    ),
}
for (_a, _b), _sentences in JOINT_NEGATIVE.items():
    NEGATIVE[_a] += _sentences
    NEGATIVE[_b] += _sentences

# how often an absent finding is stated: CT-RATE's near-fixed phrases (heart size, effusions, lymph
# nodes, nodules) almost always, the rarer findings less often
NEGATION_RATE: dict[str, float] = {f: 0.6 for f in FINDINGS} | {
    "Cardiomegaly": 0.9,
    "Pleural effusion": 0.9,
    "Pericardial effusion": 0.85,
    "Lymphadenopathy": 0.9,
    "Lung nodule": 0.75,
    "Consolidation": 0.7,
    "Lung opacity": 0.7,
}
