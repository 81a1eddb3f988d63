"""3D CLIP for chest CT volumes and radiology reports."""
