"""How the dlib extractor finds the face in an image (`hncl make-shards --dlib-detect`), and the
words it counts with. No heavy imports: the CLI's --help reads this."""

DETECT_MODES = {
    "always": "find the face with dlib's HOG detector; an image with no face is skipped and counted "
              "('no face detected'); with several faces the largest is kept and counted (default)",
    "auto": "like always, but an image with no detected face is used whole, as if it were the face crop, "
            "and counted: for face-crop datasets where HOG misses some faces (non-face images then "
            "become samples)",
    "never": "no detection: every image is taken to be a face crop (cropped or aligned datasets, e.g. "
             "RAF-DB aligned, FER2013); non-face images are not caught",
}
NO_FACE = "no face detected"
SEVERAL_FACES = "several faces (kept the largest)"
WHOLE_IMAGE = "no face detected: whole image used"
