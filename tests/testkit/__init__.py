"""Test helpers shared by the test packages (importable: pytest puts tests/ on sys.path).

- ``env``: repository and shared-data paths, CI rules for external programs, free ports;
- ``dicom_factory``: synthetic DICOM data sets and files;
- ``orthanc``: a real Orthanc server on free ports;
- ``worker_process``: a real `cxr-worker serve` subprocess, DCMTK storescp/storescu, DICOM wraps.
"""
