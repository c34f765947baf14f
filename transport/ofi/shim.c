/* Real symbols for libfabric's static inline calls: see shim.h. */
#include "shim.h"

uint32_t colo_fi_version(void) { return FI_VERSION(1, 10); }
struct fi_info *colo_fi_allocinfo(void) { return fi_allocinfo(); }
int colo_fi_domain(struct fid_fabric *fabric, struct fi_info *info, struct fid_domain **domain) {
	return fi_domain(fabric, info, domain, NULL);
}
int colo_fi_endpoint(struct fid_domain *domain, struct fi_info *info, struct fid_ep **ep) {
	return fi_endpoint(domain, info, ep, NULL);
}
int colo_fi_passive_ep(struct fid_fabric *fabric, struct fi_info *info, struct fid_pep **pep) {
	return fi_passive_ep(fabric, info, pep, NULL);
}
int colo_fi_eq_open(struct fid_fabric *fabric, struct fi_eq_attr *attr, struct fid_eq **eq) {
	return fi_eq_open(fabric, attr, eq, NULL);
}
int colo_fi_cq_open(struct fid_domain *domain, struct fi_cq_attr *attr, struct fid_cq **cq) {
	return fi_cq_open(domain, attr, cq, NULL);
}
int colo_fi_ep_bind(struct fid_ep *ep, struct fid *bfid, uint64_t flags) {
	return fi_ep_bind(ep, bfid, flags);
}
int colo_fi_pep_bind(struct fid_pep *pep, struct fid *bfid, uint64_t flags) {
	return fi_pep_bind(pep, bfid, flags);
}
int colo_fi_enable(struct fid_ep *ep) { return fi_enable(ep); }
int colo_fi_listen(struct fid_pep *pep) { return fi_listen(pep); }
int colo_fi_getname(struct fid *fid, void *addr, size_t *addrlen) {
	return fi_getname(fid, addr, addrlen);
}
int colo_fi_connect(struct fid_ep *ep, const void *addr, const void *param, size_t paramlen) {
	return fi_connect(ep, addr, param, paramlen);
}
int colo_fi_accept(struct fid_ep *ep, const void *param, size_t paramlen) {
	return fi_accept(ep, param, paramlen);
}
int colo_fi_reject(struct fid_pep *pep, fid_t handle, const void *param, size_t paramlen) {
	return fi_reject(pep, handle, param, paramlen);
}
int colo_fi_shutdown(struct fid_ep *ep, uint64_t flags) { return fi_shutdown(ep, flags); }
ssize_t colo_fi_eq_read(struct fid_eq *eq, uint32_t *event, void *buf, size_t len, uint64_t flags) {
	return fi_eq_read(eq, event, buf, len, flags);
}
ssize_t colo_fi_eq_sread(struct fid_eq *eq, uint32_t *event, void *buf, size_t len, int timeout,
                         uint64_t flags) {
	return fi_eq_sread(eq, event, buf, len, timeout, flags);
}
ssize_t colo_fi_eq_readerr(struct fid_eq *eq, struct fi_eq_err_entry *buf, uint64_t flags) {
	return fi_eq_readerr(eq, buf, flags);
}
int colo_fi_mr_reg(struct fid_domain *domain, const void *buf, size_t len, uint64_t access,
                   uint64_t offset, uint64_t requested_key, uint64_t flags, struct fid_mr **mr,
                   void *context) {
	return fi_mr_reg(domain, buf, len, access, offset, requested_key, flags, mr, context);
}
uint64_t colo_fi_mr_key(struct fid_mr *mr) { return fi_mr_key(mr); }
void *colo_fi_mr_desc(struct fid_mr *mr) { return fi_mr_desc(mr); }
int colo_fi_close(struct fid *fid) { return fi_close(fid); }
int colo_fi_av_open(struct fid_domain *domain, struct fi_av_attr *attr, struct fid_av **av) {
	return fi_av_open(domain, attr, av, NULL);
}
int colo_fi_av_insert(struct fid_av *av, const void *addr, size_t count, fi_addr_t *fi_addr,
		      uint64_t flags) {
	return fi_av_insert(av, addr, count, fi_addr, flags, NULL);
}
int colo_fi_mr_bind(struct fid_mr *mr, struct fid *bfid, uint64_t flags) {
	return fi_mr_bind(mr, bfid, flags);
}
int colo_fi_mr_enable(struct fid_mr *mr) { return fi_mr_enable(mr); }
ssize_t colo_fi_writemsg(struct fid_ep *ep, const struct fi_msg_rma *msg, uint64_t flags) {
	return fi_writemsg(ep, msg, flags);
}
ssize_t colo_fi_sendmsg(struct fid_ep *ep, const struct fi_msg *msg, uint64_t flags) {
	return fi_sendmsg(ep, msg, flags);
}
ssize_t colo_fi_senddata(struct fid_ep *ep, const void *buf, size_t len, void *desc, uint64_t data,
                         fi_addr_t dest_addr, void *context) {
	return fi_senddata(ep, buf, len, desc, data, dest_addr, context);
}
ssize_t colo_fi_recv(struct fid_ep *ep, void *buf, size_t len, void *desc, fi_addr_t src_addr,
                     void *context) {
	return fi_recv(ep, buf, len, desc, src_addr, context);
}
ssize_t colo_fi_cq_read(struct fid_cq *cq, void *buf, size_t count) {
	return fi_cq_read(cq, buf, count);
}
ssize_t colo_fi_cq_sread(struct fid_cq *cq, void *buf, size_t count, const void *cond, int timeout) {
	return fi_cq_sread(cq, buf, count, cond, timeout);
}
ssize_t colo_fi_cq_readerr(struct fid_cq *cq, struct fi_cq_err_entry *buf, uint64_t flags) {
	return fi_cq_readerr(cq, buf, flags);
}
