"""Where the model looked, as pictures and DICOM objects a viewer shows.

The map itself is trainer/cam.py (HiResCAM, computed in the scoring forward pass); its geometry
back on the source image is dicom_io.map_to_image. This package turns a map into:
  overlay.py     the colour blend, legend and burned-in text (numpy + Pillow), shared by the key image,
                 ``classify --heatmap`` and the web page's PNG
  segmentation.py  the quantitative map: a fractional DICOM Segmentation (highdicom ``seg``)
  key_image.py   the displayable picture: an RGB Secondary Capture (highdicom ``sc``)
"""
