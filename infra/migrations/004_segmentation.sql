-- Segmentation and defect size (issue #11): the Inspection v2 fields written by sinks/postgres.py.
-- defects.mask_rle / mask_area exist since 001.

ALTER TABLE defects
    ADD COLUMN polygon   real[],   -- outline x0,y0,x1,y1,... in frame pixels (NULL without a mask)
    ADD COLUMN area_mm2  real,     -- mask (else box) area when the camera's pixel size is known
    ADD COLUMN length_mm real;     -- longest extent (mask Feret diameter, else box diagonal)

ALTER TABLE inspections
    ADD COLUMN mask_uri      text,                          -- per-frame label image (pixel = defect idx + 1)
    ADD COLUMN segmenter     text,                          -- 'sam:vit_b@<sha>', 'yolo-seg:<name>@<version>'
    ADD COLUMN verdict_rules text[] NOT NULL DEFAULT '{}';  -- the rules that made the verdict FAIL

CREATE INDEX defects_length_idx ON defects (class_name, length_mm) WHERE length_mm IS NOT NULL;
