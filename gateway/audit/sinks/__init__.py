"""Audit sinks: file, syslog, HTTP (Splunk HEC, Elasticsearch/OpenSearch, webhook). See base.py for the contract."""
