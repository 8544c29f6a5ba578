"""Protocol drivers (DLMS/COSEM, Modbus, MQTT concentrators), all behind MeterSession."""
