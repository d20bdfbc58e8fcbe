"""DICOM over ISCL: synthetic studies, the gateway, pynetdicom glue and the storage SCP."""
